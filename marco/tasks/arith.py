"""Generated arithmetic word problems: a tuning split, held-out tiers and a training split that cannot leak.

The bundled SmolLM2-135M scores about 2% on MGSM, too low to tell strategies apart or to see training help;
on these problems it scores in the 10-40% band greedy, so a better search or a better model has room to show.
Problems are written from templates, deterministically from the problem's index, so the same index is the
same problem on every machine. Every problem also has a worked solution (:func:`gold_completion`): the steps
a careful solver writes, in Marco-o1's ``<Thought>…</Thought><Output>…</Output>`` format.

Splits (each a dataset name):

==================  ======  ==========================================================================
``arith``              500  tuning: one- and two-step +, -, ×, ÷ on small integers; search settings are
                            chosen here
``arith-heldout``      500  the same templates and number ranges, never looked at while tuning
``arith-hard``         500  held-out, harder: three to four steps, larger numbers, templates of their own
``arith-train``     50,000  training: every template, wider number ranges, and no (template, numbers)
                            tuple that any of the three splits above contains
==================  ======  ==========================================================================

A problem's *key* is its template and the numbers drawn for it (names and objects do not count): two
problems with the same key are the same sum. ``arith-train`` redraws any problem whose key is in an
evaluation split, so a gain after training on it cannot be memorisation of an evaluation item. (``arith``
and ``arith-heldout`` predate that rule and share keys with each other: the small number ranges hold only
~40 distinct multiplications; they are kept as they were so earlier results stay reproducible.)

Scoring and answer extraction are MGSM's (inherited).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from marco import prompts
from marco.tasks.base import Problem
from marco.tasks.mgsm import INSTRUCTIONS, MGSM

NAMES = ("Tom", "Sara", "Ben", "Lily", "Omar", "Mia", "Ravi", "Anna", "Leo", "Nina", "Sam", "Eva")
THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "balloons", "shells", "coins")


@dataclass(frozen=True)
class Worked:
    """One generated problem with its solution: ``numbers`` (with the template's name, the problem's key)
    and the ``steps`` of a worked solution, one sentence of arithmetic each."""

    question: str
    answer: int
    numbers: tuple[int, ...]
    steps: tuple[str, ...]


# A template draws its numbers from ``rng`` (``wide``: the training split's wider ranges) and writes the
# problem. The easy templates' narrow draws are exactly those of the original tuning set: do not reorder.
Template = Callable[[random.Random, str, str, bool], Worked]


def _add(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    hi = 99 if wide else 20
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    return Worked(f"{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?", a + b, (a, b),
                  (f"{n} starts with {a} {t}.", f"{n} gets {b} more, so {a} + {b} = {a + b}."))


def _sub(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a = rng.randint(8, 150 if wide else 30)
    b = rng.randint(2, a - 2)
    return Worked(f"{n} had {a} {t} and gave {b} of them to a friend. How many {t} does {n} have left?",
                  a - b, (a, b), (f"{n} had {a} {t}.", f"{n} gave away {b}, so {a} - {b} = {a - b}."))


def _mul(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b = rng.randint(2, 25 if wide else 9), rng.randint(2, 15 if wide else 6)
    return Worked(f"A box holds {a} {t}. {n} has {b} full boxes. How many {t} does {n} have?", a * b, (a, b),
                  (f"{n} has {b} boxes with {a} {t} in each box.", f"So {n} has {b} * {a} = {a * b} {t}."))


def _div(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    each, friends = rng.randint(2, 25 if wide else 9), rng.randint(2, 12 if wide else 5)
    total = each * friends
    return Worked(f"{n} shares {total} {t} equally among {friends} friends. How many {t} does each friend get?",
                  each, (total, friends),
                  (f"{n} shares {total} {t} among {friends} friends.",
                   f"Each friend gets {total} / {friends} = {each}."))


def _add_sub(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b = rng.randint(5, 80 if wide else 20), rng.randint(2, 50 if wide else 10)
    c = rng.randint(1, a + b - 1)
    return Worked(f"{n} has {a} {t}. {n} buys {b} more and then gives {c} away. How many {t} does {n} have now?",
                  a + b - c, (a, b, c),
                  (f"{n} starts with {a} {t} and buys {b} more: {a} + {b} = {a + b}.",
                   f"Then {n} gives {c} away: {a + b} - {c} = {a + b - c}."))


def _mul_add(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b, c = rng.randint(2, 12 if wide else 5), rng.randint(2, 15 if wide else 6), rng.randint(2, 40 if wide else 9)
    return Worked(f"{n} buys {a} bags with {b} {t} in each bag, and then finds {c} more {t}. "
                  f"How many {t} does {n} have in total?", a * b + c, (a, b, c),
                  (f"{a} bags with {b} {t} each hold {a} * {b} = {a * b} {t}.",
                   f"With the {c} found: {a * b} + {c} = {a * b + c}."))


# --- the hard tier: three or four steps, larger numbers --------------------------------------------------
def _packs_share(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b = rng.randint(3, 15), rng.randint(4, 25)
    d = rng.randint(2, 9)
    c = rng.randint(1, max(1, (a * b - 1) // d))
    e = rng.randint(2, 60)
    left = a * b - c * d
    return Worked(f"{n} buys {a} packs of {t} with {b} {t} in each pack. {n} gives {c} {t} to each of {d} "
                  f"friends and then finds {e} more {t}. How many {t} does {n} have now?", left + e,
                  (a, b, c, d, e),
                  (f"{a} packs with {b} {t} each: {a} * {b} = {a * b} {t}.",
                   f"{n} gives {c} to each of {d} friends: {c} * {d} = {c * d} {t}.",
                   f"After giving them away: {a * b} - {c * d} = {left}.",
                   f"After finding {e} more: {left} + {e} = {left + e}."))


def _shelf_rows(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b, c = rng.randint(3, 20), rng.randint(5, 30), rng.randint(2, 15)
    d = rng.randint(1, (a + c) * b - 1)
    return Worked(f"A shelf has {a} rows of {t} with {b} {t} in each row. {n} adds {c} more rows of {b} {t} "
                  f"and then takes {d} {t} away. How many {t} are on the shelf now?", (a + c) * b - d,
                  (a, b, c, d),
                  (f"The shelf first has {a} + {c} = {a + c} rows.",
                   f"That is {a + c} * {b} = {(a + c) * b} {t}.",
                   f"After {n} takes {d} away: {(a + c) * b} - {d} = {(a + c) * b - d}."))


def _share_after_buying(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    b, c = rng.randint(2, 12), rng.randint(3, 20)
    d = rng.randint(2, 9)
    each = rng.randint(b * c // d + 1, b * c // d + 40)
    a = each * d - b * c
    return Worked(f"{n} has {a} {t} and buys {b} boxes with {c} {t} in each box. {n} then shares all the {t} "
                  f"equally among {d} friends. How many {t} does each friend get?", each, (a, b, c, d),
                  (f"The boxes hold {b} * {c} = {b * c} {t}.",
                   f"Altogether {n} has {a} + {b * c} = {a + b * c} {t}.",
                   f"Each friend gets {a + b * c} / {d} = {each}."))


def _two_days(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b = rng.randint(5, 60), rng.randint(2, 9)
    c = rng.randint(1, a + a * b - 1)
    return Worked(f"On Monday {n} collects {a} {t}. On Tuesday {n} collects {b} times as many {t} as on Monday. "
                  f"Then {n} loses {c} {t}. How many {t} does {n} have now?", a + a * b - c, (a, b, c),
                  (f"On Tuesday {n} collects {b} * {a} = {a * b} {t}.",
                   f"Over both days: {a} + {a * b} = {a + a * b} {t}.",
                   f"After losing {c}: {a + a * b} - {c} = {a + a * b - c}."))


def _sales(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b, c, d = rng.randint(3, 30), rng.randint(2, 15), rng.randint(3, 30), rng.randint(2, 15)
    e = rng.randint(1, a * b + c * d - 1)
    total = a * b + c * d
    return Worked(f"{n} sells {a} big {t} for {b} dollars each and {c} small {t} for {d} dollars each, and then "
                  f"spends {e} dollars. How many dollars does {n} have left?", total - e, (a, b, c, d, e),
                  (f"The big {t} bring {a} * {b} = {a * b} dollars.",
                   f"The small {t} bring {c} * {d} = {c * d} dollars.",
                   f"Together: {a * b} + {c * d} = {total} dollars.",
                   f"After spending {e}: {total} - {e} = {total - e}."))


def _classes(rng: random.Random, n: str, t: str, wide: bool) -> Worked:
    a, b, c = rng.randint(2, 9), rng.randint(10, 35), rng.randint(2, 6)
    need = a * b * c
    d = rng.randint(1, need - 1)
    return Worked(f"A school has {a} classes with {b} students in each class. Every student needs {c} {t}. "
                  f"{n} has already collected {d} {t}. How many more {t} does {n} need?", need - d, (a, b, c, d),
                  (f"There are {a} * {b} = {a * b} students.",
                   f"They need {a * b} * {c} = {need} {t}.",
                   f"{n} still needs {need} - {d} = {need - d}."))


EASY: tuple[Template, ...] = (_add, _sub, _mul, _div, _add_sub, _mul_add)
HARD: tuple[Template, ...] = (_packs_share, _shelf_rows, _share_after_buying, _two_days, _sales, _classes)
TEMPLATES = EASY  # the tuning set's (kept for callers of the original module)


@dataclass(frozen=True)
class Split:
    """One split: problem ``i`` is drawn from ``random.Random(offset + i)`` with template ``i % len``."""

    name: str
    offset: int
    size: int
    templates: tuple[Template, ...]
    wide: bool = False
    exclude_evaluation: bool = False  # redraw any problem whose key is in an evaluation split
    evaluation: bool = True  # results are reported on it; never trained on


SPLITS: dict[str, Split] = {
    s.name: s for s in (
        Split("arith", 0, 500, EASY),
        Split("arith-heldout", 1_000_000, 500, EASY),
        Split("arith-hard", 2_000_000, 500, HARD),
        Split("arith-train", 10_000_000, 50_000, EASY + HARD, wide=True, exclude_evaluation=True,
              evaluation=False),
    )
}
SPLIT_SIZE = 500  # problems per evaluation split (a --limit takes the first ones)
HELDOUT_OFFSET = SPLITS["arith-heldout"].offset
MAX_REDRAWS = 1000


def template_name(template: Template) -> str:
    return template.__name__.lstrip("_")


def _draw(split: Split, index: int) -> tuple[Template, Worked]:
    rng = random.Random(split.offset + index)
    template = split.templates[index % len(split.templates)]
    taken = evaluation_keys() if split.exclude_evaluation else frozenset()
    for _ in range(MAX_REDRAWS):
        worked = template(rng, rng.choice(NAMES), rng.choice(THINGS), split.wide)
        if (template_name(template), worked.numbers) not in taken:
            return template, worked
    raise RuntimeError(f"{split.name}[{index}]: no problem outside the evaluation splits in {MAX_REDRAWS} draws")


def worked(dataset: str, index: int) -> Worked:
    """Problem ``index`` of split ``dataset`` with its worked solution."""
    return _draw(_split(dataset), index)[1]


def problem_key(dataset: str, index: int) -> tuple[str, tuple[int, ...]]:
    """``(template, numbers)``: what makes two problems the same sum."""
    template, w = _draw(_split(dataset), index)
    return template_name(template), w.numbers


@functools.cache
def evaluation_keys() -> frozenset[tuple[str, tuple[int, ...]]]:
    """Every key of every evaluation split (what ``arith-train`` never contains)."""
    return frozenset(problem_key(s.name, i) for s in SPLITS.values() if s.evaluation for i in range(s.size))


def make_problem(dataset: str, index: int, seed: int | None = None) -> Problem:
    """Problem ``index`` of split ``dataset`` (``seed`` is accepted for old callers and must match)."""
    split = _split(dataset)
    if seed is not None and seed != split.offset + index:
        raise ValueError(f"{dataset}[{index}] is drawn with seed {split.offset + index}, not {seed}")
    template, w = _draw(split, index)
    return Problem(dataset, "en", index, w.question, (str(w.answer),), meta={"template": template_name(template)})


def gold_completion(w: Worked) -> str:
    """The worked solution as an assistant message in Marco-o1's format: one step per paragraph (so a
    ``step`` action sees the same steps), then the bare number in ``<Output>``."""
    thought = "\n\n".join((*w.steps, f"The answer is {w.answer}."))
    return prompts.format_completion(thought, str(w.answer))


def gold_cot_rows(dataset: str = "arith-train", start: int = 0, limit: int | None = None) -> Iterator[dict]:
    """Open-O1-style ``{"instruction", "output"}`` rows of worked solutions of a *training* split (what
    ``marco import-cot`` and SFT sources read); an evaluation split is refused."""
    split = _split(dataset)
    if split.evaluation:
        trainable = ", ".join(s.name for s in SPLITS.values() if not s.evaluation)
        raise ValueError(f"{dataset} is an evaluation split: its worked solutions are never training data "
                         f"(use {trainable})")
    end = split.size if limit is None else min(split.size, start + limit)
    for i in range(start, end):
        w = worked(dataset, i)
        yield {"instruction": f"{w.question}\n\n{INSTRUCTIONS['en']}", "output": gold_completion(w),
               "answer": str(w.answer), "source": f"{dataset}/{i}"}


def _split(dataset: str) -> Split:
    try:
        return SPLITS[dataset]
    except KeyError:
        raise ValueError(f"unknown arith split {dataset!r}; choose one of {', '.join(SPLITS)}") from None


@dataclass
class Arith(MGSM):
    """Generated arithmetic word problems (English, integer answers); MGSM's extraction and scoring."""

    name: str = "arith"

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        """The first ``limit`` problems of this split (the whole split when None); ``data_dir`` is ignored."""
        wanted = {p.strip() for item in (langs or ()) for p in item.split(",") if p.strip()}
        if wanted - {"en", "all"}:
            raise ValueError(f"the arith set is English only (lang 'en'), not {','.join(sorted(wanted))!r}")
        size = _split(self.name).size
        if limit is not None and not 0 < limit <= size:
            raise ValueError(f"--limit must be between 1 and {size} for {self.name}")
        return [make_problem(self.name, i) for i in range(size if limit is None else limit)]

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return prompts.chat(f"{problem.question}\n\n{INSTRUCTIONS['en']}", self.system)


def heldout() -> Arith:
    """The held-out split (``arith-heldout``)."""
    return Arith(name="arith-heldout")


def hard() -> Arith:
    """The harder held-out tier (``arith-hard``)."""
    return Arith(name="arith-hard")


def train() -> Arith:
    """The training split (``arith-train``)."""
    return Arith(name="arith-train")
