"""Options shared by every command that runs a search (one definition, used by solve, run and submit)."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from marco.search.base import SearchConfig

STRATEGY_HELP = "greedy (one chain) | sc (self-consistency@N vote) | bon (best-of-N by confidence) | mcts"


@dataclass
class SearchOptions:
    """The CLI's search flags, turned into a :class:`SearchConfig`."""

    strategy: str
    action: str
    reflect: bool
    budget: int
    n: int
    children: int
    temperature: float
    select: str
    seed: int
    exploration: float = SearchConfig.exploration
    top_p: float = SearchConfig.top_p
    reuse: bool = SearchConfig.reuse
    cut_penalty: float = SearchConfig.cut_penalty
    final_value: str = SearchConfig.final_value
    normalize: bool = SearchConfig.normalize
    fill: bool = SearchConfig.fill
    widen: bool = SearchConfig.widen
    merge: bool = SearchConfig.merge

    def config(self) -> SearchConfig:
        try:
            return SearchConfig(
                strategy=self.strategy, action=self.action, reflect=self.reflect, budget=self.budget,
                n=parse_n(self.n), children=self.children, temperature=self.temperature, select=self.select,
                seed=self.seed, exploration=self.exploration, top_p=self.top_p, reuse=self.reuse,
                cut_penalty=self.cut_penalty, final_value=self.final_value, normalize=self.normalize,
                fill=self.fill, widen=self.widen, merge=self.merge,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None


def parse_n(value: int | str) -> int:
    """``--n``: ``auto`` (as many chains as the budget pays: 0) or a positive cap."""
    text = str(value).strip().lower()
    if text == "auto":
        return 0
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"--n must be 'auto' or a positive number of chains, got {value!r}")
    return int(text)


Strategy = typer.Option("mcts", "--strategy", "-s", help=STRATEGY_HELP)
Action = typer.Option("ministep:32", "--action", "-a", help="MCTS action: 'step' (until a blank line) or 'ministep:N' (N tokens).")
Reflect = typer.Option(False, "--reflect/--no-reflect", help="Append 'Wait! Maybe I made some mistakes! ...' after a thought.")
Budget = typer.Option(1024, "--budget", "-b", help="Generated tokens allowed per problem (all rollouts included).")
N = typer.Option("auto", "--n", help="Most chains for sc and bon; 'auto': as many as the budget pays (they draw "
                 "chains in waves until the budget left cannot pay for another).")
Children = typer.Option(3, "--children", "-k", help="Children per MCTS expansion.")
Temperature = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature (greedy ignores it).")
Select = typer.Option(SearchConfig.select, "--select", help="How MCTS picks its final answer: value (best mean Q from the root) | visits (most visited child) | robust (most visited child, ties by the best answer below) | max-value (best-valued answer of the tree) | vote (value-weighted majority).")
Seed = typer.Option(0, "--seed", help="Seed: the same seed gives the same search.")
Exploration = typer.Option(SearchConfig.exploration, "--exploration", "-c", help="MCTS UCT constant c (Q lies in a narrow band, so large c is near breadth-first).")
TopP = typer.Option(SearchConfig.top_p, "--top-p", help="Nucleus sampling threshold (greedy ignores it).")
Reuse = typer.Option(SearchConfig.reuse, "--reuse/--no-reuse", help="MCTS: a child's stored rollout supplies the first of its k children (no token generated twice).")
CutPenalty = typer.Option(SearchConfig.cut_penalty, "--cut-penalty", help="MCTS: subtracted from the value of a sample with no <Output> (cut by the token limit, or ended without one) (1: no reward).")
FinalValue = typer.Option(SearchConfig.final_value, "--final-value", help="MCTS final pick compares: node (its sample's value) | path (mean confidence from the root).")
Normalize = typer.Option(SearchConfig.normalize, "--normalize/--no-normalize", help="MCTS: rescale Q to [0, 1] among siblings before UCT.")
Fill = typer.Option(SearchConfig.fill, "--fill/--no-fill", help="MCTS: when the budget left cannot pay for k typical samples, the last expansion takes as many as it pays (spends the budget like sc/bon).")
Widen = typer.Option(SearchConfig.widen, "--widen/--no-widen", help="MCTS: when every selected leaf is finished, grow new chains from the root while the budget pays.")
Merge = typer.Option(SearchConfig.merge, "--merge/--no-merge", help="MCTS: two samples of a node with the same action tokens become one child (visits and values add up).")
Model = typer.Option("smollm2", "--model", "-m", help="smollm2 (bundled) | a .gguf file | a model dir or HF id | scripted | checkpoint:ID | server[+llamacpp|vllm|sglang|openai]:http://HOST:PORT[/v1][#MODEL] (a model server, see docs/engines.md) | vllm:smollm2 or vllm:DIR|HUB_ID (vLLM: in-process, or a private server from .venv-vllm; docs/engines.md).")
DataDir = typer.Option(
    None, "--data-dir", envvar="MARCO_DATA_DIR", show_envvar=True,
    help="Override the data shipped with marco (MGSM, FLORES-200 zh-en) with this folder; WMT22 zh-en is read from here too.",
)
Testset = typer.Option(
    None, "--testset", help="Translation test set: flores200 (default, shipped) | wmt22 (data dir, sacrebleu cache or download).",
)
