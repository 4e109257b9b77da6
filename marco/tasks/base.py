"""What every task provides: problems, a prompt, answer extraction and scoring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Problem:
    """One item of a dataset.

    ``references`` holds every accepted reference (MGSM: the numeric answer; translation: one or two
    reference translations). ``error`` is set when the source row was malformed: such a problem is not
    searched, and its reason is kept with it in the store.
    """

    dataset: str
    lang: str
    index: int
    question: str
    references: tuple[str, ...] = ()
    error: str | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """Stable identity within a dataset, e.g. ``mgsm/en/12``."""
        return f"{self.dataset}/{self.lang}/{self.index}"


@dataclass(frozen=True)
class Score:
    """A scored answer. ``correct`` is None for tasks scored by a corpus metric (translation)."""

    correct: bool | None
    value: float


class Task(Protocol):
    """A dataset family: load problems, prompt for them, extract and score answers."""

    name: str

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        ...

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages (system prompt included) asking the model to solve ``problem``."""
        ...

    def extract(self, text: str, problem: Problem) -> str | None:
        """The final answer in a completion, or None when there is none."""
        ...

    def score(self, answer: str | None, problem: Problem) -> Score:
        ...

    def corpus_metrics(self, answers: Sequence[str | None], problems: Sequence[Problem]) -> dict[str, float]:
        """Dataset-level metrics (accuracy; chrF and BLEU for translation)."""
        ...
