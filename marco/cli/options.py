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

    def config(self) -> SearchConfig:
        try:
            return SearchConfig(
                strategy=self.strategy, action=self.action, reflect=self.reflect, budget=self.budget, n=self.n,
                children=self.children, temperature=self.temperature, select=self.select, seed=self.seed,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None


Strategy = typer.Option("mcts", "--strategy", "-s", help=STRATEGY_HELP)
Action = typer.Option("ministep:32", "--action", "-a", help="MCTS action: 'step' (until a blank line) or 'ministep:N' (N tokens).")
Reflect = typer.Option(False, "--reflect/--no-reflect", help="Append 'Wait! Maybe I made some mistakes! ...' after a thought.")
Budget = typer.Option(1024, "--budget", "-b", help="Generated tokens allowed per problem (all rollouts included).")
N = typer.Option(4, "--n", help="Samples for sc and bon.")
Children = typer.Option(3, "--children", "-k", help="Children per MCTS expansion.")
Temperature = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature (greedy ignores it).")
Select = typer.Option("value", "--select", help="How MCTS picks its answer: value | visits | vote.")
Seed = typer.Option(0, "--seed", help="Seed: the same seed gives the same search.")
Model = typer.Option("smollm2", "--model", "-m", help="smollm2 (bundled) | a .gguf file | a model dir or HF id | scripted | checkpoint:ID | server[+llamacpp|vllm|sglang|openai]:http://HOST:PORT[/v1][#MODEL] (a model server, see docs/engines.md) | vllm:MODEL (vLLM in-process).")
DataDir = typer.Option(
    None, "--data-dir", envvar="MARCO_DATA_DIR", show_envvar=True,
    help="Override the data shipped with marco (MGSM, FLORES-200 zh-en) with this folder; WMT22 zh-en is read from here too.",
)
Testset = typer.Option(
    None, "--testset", help="Translation test set: flores200 (default, shipped) | wmt22 (data dir, sacrebleu cache or download).",
)
