"""What a synthesis run selects from the store, and what it reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

DEDUP_MODES = ("none", "exact", "near")


@dataclass
class SynthesisConfig:
    """Which stored searches become CoT examples, and which of their paths.

    With every field at its default this takes the chosen path of every completed search. ``top_k`` takes
    instead the k best answer paths (by value) of each problem, over every search of it; ``correct_only``
    keeps paths whose answer scores correct; ``min_value`` keeps paths whose value (mean token confidence of
    the sample that produced the answer) is at least that; ``dedup`` drops exact (or near, MinHash Jaccard ≥
    ``near_threshold``) duplicates of an earlier example. ``pairs`` also builds preference pairs: per
    problem, its best correct path against its best-valued wrong one. ``step_pairs`` builds pairs from the
    tree itself: at every node with two or more expanded (step/mini-step) children, the child with the highest
    mean value Q against the lowest, when they differ by at least ``pair_margin``; the prompt is the question
    plus the shared reasoning prefix (``meta["prefix"]``), chosen/rejected are the two steps' texts.
    """

    batches: list[str] = field(default_factory=list)
    dataset: str | None = None
    langs: list[str] = field(default_factory=list)
    correct_only: bool = False
    min_value: float | None = None
    top_k: int | None = None
    dedup: str = "exact"
    near_threshold: float = 0.8
    pairs: bool = False
    step_pairs: bool = False
    pair_margin: float = 0.1

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        if self.dedup not in DEDUP_MODES:
            raise ValueError(f"unknown dedup {self.dedup!r}; choose one of {', '.join(DEDUP_MODES)}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.near_threshold}")
        if self.min_value is not None and not 0.0 <= self.min_value <= 1.0:
            raise ValueError(f"--min-value is a confidence between 0 and 1, got {self.min_value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SynthesisConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class SynthesisResult:
    """A run's output: the examples and pairs it kept, and what each step removed."""

    run_id: str
    examples: list[Any]
    pairs: list[Any]
    report: Any  # marco.data.FilterReport
    searches: int = 0
    problems: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "searches": self.searches,
            "problems": self.problems,
            "examples": len(self.examples),
            "pairs": len(self.pairs),
            "report": self.report.to_dict(),
        }
