"""Search configuration and results shared by every strategy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from marco.search.tree import Tree
from marco.tasks.base import Problem, Score

STRATEGIES = ("greedy", "sc", "bon", "mcts")
SELECTIONS = ("value", "visits", "vote")
REFLECTION = "Wait! Maybe I made some mistakes! I need to rethink from scratch."


@dataclass
class SearchConfig:
    """How one problem is searched. Every strategy respects ``budget`` (generated tokens per problem).

    ``action`` is ``step`` (a reasoning step ends at a blank line inside ``<Thought>``) or
    ``ministep:N`` (exactly N generated tokens). ``children`` is k, the children per MCTS expansion;
    ``n`` the samples of self-consistency and best-of-N.
    """

    strategy: str = "mcts"
    action: str = "ministep:32"
    reflect: bool = False
    budget: int = 2048
    n: int = 4
    children: int = 3
    max_rounds: int = 64
    max_depth: int = 12
    exploration: float = 1.0
    temperature: float = 0.7
    top_p: float = 0.95
    max_answer_tokens: int = 384
    max_step_tokens: int = 128
    select: str = "value"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown selection {self.select!r}; choose one of {', '.join(SELECTIONS)}")
        self.ministep_tokens  # validates action
        if self.budget <= 0:
            raise ValueError("budget must be a positive number of tokens")

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
        """Short name for tables, e.g. ``mcts/ministep:32+reflect``."""
        base = self.strategy if self.strategy != "mcts" else f"mcts/{self.action}"
        if self.strategy in ("sc", "bon"):
            base = f"{self.strategy}@{self.n}"
        return base + ("+reflect" if self.reflect else "")

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
