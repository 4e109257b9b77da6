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


@dataclass(frozen=True)
class DatasetInfo:
    """One line of ``marco data list``: a dataset (or one language of it), where it is read from, its size."""

    name: str
    subset: str  # language or language pair
    rows: int | None  # None: not available here
    source: str  # "packaged", "built in", "data dir PATH", "sacrebleu cache PATH" or "not available"
    licence: str
    select: str  # the flags that pick it, e.g. "--dataset mgsm --lang en"
    note: str = ""  # why it is not available, and what to do


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

    # Optional: ``catalog(data_dir) -> list[DatasetInfo]`` describes the task's data for ``marco data list``
    # (see :func:`marco.tasks.catalog`); a task without it is described by loading it.
