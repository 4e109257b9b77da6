"""Quality filters for CoT data, as small pipeline steps (datatrove-style).

Each step sees a stream of :class:`CotExample` and passes on the ones it keeps; what it drops is counted in
its :class:`StepStats` with a few sampled reasons. The steps follow the filtering the Marco-o1 paper applies
to the Open-O1 CoT data: well-formed ``<Thought>``/``<Output>``, length bounds, language, exact and near
duplicates.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from marco.data.examples import CotExample, parse_answer
from marco.data.lang import detect_lang
from marco.data.minhash import NearDuplicateIndex, normalize

SAMPLES_PER_STEP = 3


@dataclass
class StepStats:
    """What one step saw and removed; ``samples`` holds the first few ``(example label, reason)``."""

    name: str
    seen: int = 0
    removed: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.seen - self.removed

    def drop(self, example_id: str, reason: str) -> None:
        self.removed += 1
        if len(self.samples) < SAMPLES_PER_STEP:
            self.samples.append((example_id, reason))


@dataclass
class FilterReport:
    """Per-step counts of a filtering run, in pipeline order."""

    steps: list[StepStats] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.steps[0].seen if self.steps else 0

    @property
    def kept(self) -> int:
        return self.steps[-1].kept if self.steps else 0

    def removed_by(self, name: str) -> int:
        return sum(s.removed for s in self.steps if s.name == name)

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "kept": self.kept,
            "steps": [
                {"name": s.name, "seen": s.seen, "removed": s.removed, "samples": [list(x) for x in s.samples]}
                for s in self.steps
            ],
        }


def label(example: CotExample) -> str:
    """How reports name an example: its source row when it has one (``row 12``), else its id."""
    row = example.meta.get("row")
    return f"row {row}" if row is not None else example.id


class Filter(ABC):
    """A pipeline step that keeps or drops each example. ``reject`` returns a reason to drop, or None."""

    name: str = "filter"

    def reset(self) -> None:
        """Forget any state from an earlier run (dedup steps keep what they have seen)."""

    @abstractmethod
    def reject(self, example: CotExample) -> str | None: ...

    def run(self, examples: Iterable[CotExample], stats: StepStats) -> Iterator[CotExample]:
        self.reset()
        for example in examples:
            stats.seen += 1
            reason = self.reject(example)
            if reason is None:
                yield example
            else:
                stats.drop(label(example), reason)


class WellFormed(Filter):
    """The assistant answer is ``<Thought>…</Thought>`` then ``<Output>…</Output>``, both non-empty, each tag
    exactly once and nothing outside them."""

    name = "well_formed"

    def reject(self, example: CotExample) -> str | None:
        answer = example.answer
        if not example.question.strip():
            return "no user question"
        if not answer.strip():
            return "no assistant answer"
        for tag in ("<Thought>", "</Thought>", "<Output>", "</Output>"):
            n = answer.count(tag)
            if n != 1:
                return f"{tag} appears {n} times"
        parsed = parse_answer(answer)
        if parsed is None:
            return "tags out of order or text outside <Thought>/<Output>"
        thought, output = parsed
        if not thought:
            return "empty <Thought>"
        if not output:
            return "empty <Output>"
        return None


@dataclass
class LengthBounds(Filter):
    """Characters of the assistant answer within ``[min_chars, max_chars]`` (None: unbounded)."""

    min_chars: int | None = 20
    max_chars: int | None = 16_000
    name: str = "length"

    def __post_init__(self) -> None:
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")

    def reject(self, example: CotExample) -> str | None:
        n = len(example.answer)
        if self.min_chars is not None and n < self.min_chars:
            return f"answer has {n} chars < {self.min_chars}"
        if self.max_chars is not None and n > self.max_chars:
            return f"answer has {n} chars > {self.max_chars}"
        return None


@dataclass
class Language(Filter):
    """Keep examples whose detected language (question and answer together) is one of ``langs``.

    Sets ``example.lang`` to the detected language. With ``consistent``, the question and the answer must
    also be detected as the same language (drops answers that switch language, a known Open-O1 artefact).
    """

    langs: Sequence[str] | None = None
    consistent: bool = False
    name: str = "language"

    def reject(self, example: CotExample) -> str | None:
        lang = detect_lang(example.question + "\n" + example.answer)
        example.lang = lang
        if self.langs and lang not in self.langs:
            return f"language {lang or 'unknown'} not in {','.join(self.langs)}"
        if self.consistent:
            q, a = detect_lang(example.question), detect_lang(example.answer)
            if q and a and q != a:
                return f"question is {q} but answer is {a}"
        return None


class ExactDedup(Filter):
    """Drop an example whose question and answer equal an earlier one's (ignoring case and whitespace)."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self._seen: dict[bytes, str] = {}

    def reset(self) -> None:
        self._seen = {}

    def reject(self, example: CotExample) -> str | None:
        key = hashlib.blake2b(
            (normalize(example.question) + "\x00" + normalize(example.answer)).encode("utf-8"), digest_size=16
        ).digest()
        first = self._seen.get(key)
        if first is not None:
            return f"same as {first}"
        self._seen[key] = label(example)
        return None


class NearDedup(Filter):
    """Drop an example whose question+answer has estimated Jaccard similarity ≥ ``threshold`` (character
    5-shingles, MinHash with LSH) with an earlier kept one."""

    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 0) -> None:
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self._index = NearDuplicateIndex(threshold, num_perm, seed)

    def reset(self) -> None:
        self._index = NearDuplicateIndex(self.threshold, self.num_perm, self.seed)

    def reject(self, example: CotExample) -> str | None:
        hit = self._index.add(label(example), example.question + "\n" + example.answer)
        return None if hit is None else f"{hit[1]:.2f} similar to {hit[0]}"


def run_filters(
    examples: Iterable[CotExample], steps: Sequence[Filter], report: FilterReport | None = None
) -> tuple[list[CotExample], FilterReport]:
    """Stream ``examples`` through ``steps`` in order; return the kept examples and the report."""
    report = report if report is not None else FilterReport()
    stream: Iterable[CotExample] = examples
    for step in steps:
        stats = StepStats(step.name)
        report.steps.append(stats)
        stream = step.run(stream, stats)
    return list(stream), report


def default_filters(
    min_chars: int | None = 20,
    max_chars: int | None = 16_000,
    langs: Sequence[str] | None = None,
    near_dup_threshold: float | None = 0.8,
    consistent_lang: bool = False,
) -> list[Filter]:
    """The paper's filters in a sensible order (cheap checks first, dedup last so it sees only good rows)."""
    steps: list[Filter] = [
        WellFormed(),
        LengthBounds(min_chars, max_chars),
        Language(langs, consistent_lang),
        ExactDedup(),
    ]
    if near_dup_threshold is not None:
        steps.append(NearDedup(near_dup_threshold))
    return steps
