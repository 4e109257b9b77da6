"""Search configuration and results shared by every strategy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from marco.search.tree import Tree
from marco.tasks.base import Problem, Score

STRATEGIES = ("greedy", "sc", "bon", "mcts")
SELECTIONS = ("value", "visits", "robust", "max-value", "vote")
FINAL_VALUES = ("node", "path")
REFLECTION = "Wait! Maybe I made some mistakes! I need to rethink from scratch."
LABEL_MAX = 100  # searches.label is a String(100)


@dataclass
class SearchConfig:
    """How one problem is searched. Every strategy may spend the whole ``budget`` (generated tokens per
    problem) and reports what it spent.

    ``action`` is ``step`` (a reasoning step ends at a blank line inside ``<Thought>``) or
    ``ministep:N`` (exactly N generated tokens). ``children`` is k, the children per MCTS expansion.
    ``n`` caps the chains of self-consistency and best-of-N; 0 (``--n auto``) draws chains in waves for as
    long as the budget pays for another one.

    MCTS settings: ``exploration`` is the UCT constant c; ``normalize`` rescales Q to [0, 1] among siblings
    before UCT; ``reuse`` lets a child's stored rollout supply the first of its k children when it is
    expanded (no token generated twice); ``cut_penalty`` is subtracted (floored at 0) from the value of a
    sample that wrote no ``<Output>``, whether the token limit cut it or the model ended it (EOS) without
    one (1.0: such a sample earns nothing; the default 0.5 ranks it below every finished sample, whose
    values lie in ~0.7-0.95, while such samples keep their order among themselves);
    ``merge``: two samples of one node whose actions are the same tokens become one child (its visits and
    value sums add up; the later sample's continuation is kept as an extra rollout under it);
    ``select`` is the final pick (see :mod:`marco.search.mcts`): ``value`` follows the best mean Q from the
    root, ``visits`` the most visited child, ``robust`` the most visited child with ties broken by the best
    answer below it, ``max-value`` takes the best-valued answer of the whole tree, ``vote`` a value-weighted
    majority;
    ``final_value`` is what the final pick compares among answers: ``node`` (the value of the sample that
    produced it) or ``path`` (mean confidence of every generated token from the root to the answer);
    ``reflect_rollouts`` also reflects when a rollout (not only an action) closes the thought.
    ``fill``: when the budget left cannot pay for a whole expansion (k samples of the typical length), the
    last one takes as many samples as it pays for instead of stopping, so MCTS spends its budget as the
    sc/bon waves do. ``widen``: when every leaf the selection reaches is finished, the root gets new
    children (whole new chains) while the budget pays, instead of the search ending early.
    """

    strategy: str = "mcts"
    action: str = "ministep:32"
    reflect: bool = False
    budget: int = 2048
    n: int = 0
    children: int = 3
    max_rounds: int = 64
    max_depth: int = 12
    exploration: float = 1.0
    temperature: float = 0.7
    top_p: float = 0.95
    max_answer_tokens: int = 384
    max_step_tokens: int = 128
    select: str = "value"  # docs/results.md 0c: on real trees, 21 won / 6 lost against max-value
    seed: int = 0
    reuse: bool = True
    merge: bool = True
    cut_penalty: float = 0.5
    final_value: str = "node"
    normalize: bool = False
    reflect_rollouts: bool = True
    fill: bool = False
    widen: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown selection {self.select!r}; choose one of {', '.join(SELECTIONS)}")
        if self.final_value not in FINAL_VALUES:
            raise ValueError(f"unknown final value {self.final_value!r}; choose one of {', '.join(FINAL_VALUES)}")
        self.ministep_tokens  # validates action
        if self.budget <= 0:
            raise ValueError("budget must be a positive number of tokens")
        if self.n < 0:
            raise ValueError("n must be 0 (auto: as many chains as the budget pays) or a positive cap")
        if self.children <= 0:
            raise ValueError("children (k) must be at least 1")
        if self.exploration < 0:
            raise ValueError("exploration (the UCT constant c) must be >= 0")
        if self.cut_penalty < 0:
            raise ValueError("cut_penalty must be >= 0")

    @property
    def ministep_tokens(self) -> int | None:
        """N for ``ministep:N``, None for ``step``."""
        if self.action == "step":
            return None
        kind, _, size = self.action.partition(":")
        if kind != "ministep" or not size.isdigit() or int(size) <= 0:
            raise ValueError(f"unknown action {self.action!r}; use 'step' or 'ministep:N' (e.g. ministep:32)")
        return int(size)

    @property
    def label(self) -> str:
        """The search's identity in the store and its row name in tables: every setting that changes the
        result, e.g. ``mcts/ministep:32/k3/c0.5/b1024/t0.7/p0.95/value`` or ``sc@auto/b1024/t0.7/p0.95``.
        Settings at their defaults that only some searches change are left out (``+reflect``,
        ``/noreuse``, ``/s3`` ...); a label longer than the store's column ends in a hash of the config."""
        if self.strategy == "greedy":
            parts = ["greedy", f"b{self.budget}"]
        elif self.strategy in ("sc", "bon"):
            parts = [f"{self.strategy}@{self.n or 'auto'}", f"b{self.budget}", f"t{self.temperature:g}",
                     f"p{self.top_p:g}"]
        else:
            parts = [f"mcts/{self.action}", f"k{self.children}", f"c{self.exploration:g}", f"b{self.budget}",
                     f"t{self.temperature:g}", f"p{self.top_p:g}", self.select]
        defaults = SearchConfig.__dataclass_fields__
        extras = {
            "noreuse": self.strategy == "mcts" and not self.reuse,
            "nomerge": self.strategy == "mcts" and not self.merge,
            "norm": self.strategy == "mcts" and self.normalize,
            f"cut{self.cut_penalty:g}": self.strategy == "mcts" and self.cut_penalty != defaults["cut_penalty"].default,
            f"final-{self.final_value}": self.strategy == "mcts" and self.final_value != "node",
            "norollrefl": self.strategy == "mcts" and self.reflect and not self.reflect_rollouts,
            "fill": self.strategy == "mcts" and self.fill,
            "widen": self.strategy == "mcts" and self.widen,
            f"ans{self.max_answer_tokens}": self.max_answer_tokens != defaults["max_answer_tokens"].default,
            f"stepmax{self.max_step_tokens}": self.action == "step" and self.max_step_tokens != defaults["max_step_tokens"].default,
            f"rounds{self.max_rounds}": self.strategy == "mcts" and self.max_rounds != defaults["max_rounds"].default,
            f"depth{self.max_depth}": self.strategy == "mcts" and self.max_depth != defaults["max_depth"].default,
            f"s{self.seed}": self.seed != 0,
        }
        label = "/".join(parts + [k for k, on in extras.items() if on]) + ("+reflect" if self.reflect else "")
        if len(label) > LABEL_MAX:
            digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
            label = label[: LABEL_MAX - 9] + "~" + digest
        return label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class SearchResult:
    """The outcome of one search: the whole tree, the chosen answer and what it cost."""

    search_id: str
    problem: Problem
    config: SearchConfig
    tree: Tree
    final_node_id: str | None = None
    answer: str | None = None
    confidence: float | None = None
    tokens: int = 0
    rounds: int = 0
    elapsed_s: float = 0.0
    score: Score | None = None
    error: str | None = None
    chosen_path: list[str] = field(default_factory=list)

    @property
    def correct(self) -> bool | None:
        return None if self.score is None else self.score.correct

    @property
    def reflections(self) -> int:
        """Reflection nodes in the tree (how often the search appended the reflection sentence)."""
        return sum(1 for n in self.tree if n.kind == "reflection")

    @property
    def depth(self) -> int:
        """Deepest non-rollout node of the tree (0: only the root)."""
        return max((n.depth for n in self.tree if n.kind != "rollout"), default=0)

    @property
    def path_depth(self) -> int:
        """Depth of the chosen answer's path: its deepest non-rollout node (0: no answer, or the answer is a
        rollout straight under the root)."""
        nodes = [self.tree.nodes[i] for i in self.chosen_path if i in self.tree.nodes]
        return max((n.depth for n in nodes if n.kind != "rollout"), default=0)
