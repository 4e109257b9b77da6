"""A generated set of simple arithmetic word problems: the tuning set for comparing search strategies.

The bundled SmolLM2-135M scores about 2% on MGSM, too low to tell strategies apart; on these problems it
scores in the 10-40% band greedy, so a better search has room to show. Problems are written here from a
handful of templates (one- and two-step +, -, ×, ÷ on small integers, integer answers), deterministically
from the problem's index, so the same index is the same problem on every machine.

Two splits with disjoint index ranges: ``arith`` (the tuning split: templates and search settings were chosen
on it) and ``arith-heldout`` (never looked at while tuning; results are checked there). Scoring and answer
extraction are MGSM's (inherited).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from marco import prompts
from marco.tasks.base import Problem
from marco.tasks.mgsm import INSTRUCTIONS, MGSM

SPLIT_SIZE = 500  # problems per split (a --limit takes the first ones)
HELDOUT_OFFSET = 1_000_000  # the held-out split's seeds start here: no overlap with the tuning split

NAMES = ("Tom", "Sara", "Ben", "Lily", "Omar", "Mia", "Ravi", "Anna", "Leo", "Nina", "Sam", "Eva")
THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "balloons", "shells", "coins")
Template = Callable[[random.Random, str, str], tuple[str, int]]


def _add(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return f"{name} has {a} {things}. {name} gets {b} more {things}. How many {things} does {name} have now?", a + b


def _sub(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    a = rng.randint(8, 30)
    b = rng.randint(2, a - 2)
    return (f"{name} had {a} {things} and gave {b} of them to a friend. How many {things} does {name} have left?",
            a - b)


def _mul(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 6)
    return f"A box holds {a} {things}. {name} has {b} full boxes. How many {things} does {name} have?", a * b


def _div(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    each, friends = rng.randint(2, 9), rng.randint(2, 5)
    return (f"{name} shares {each * friends} {things} equally among {friends} friends. "
            f"How many {things} does each friend get?", each)


def _add_sub(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    a, b = rng.randint(5, 20), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {things}. {name} buys {b} more and then gives {c} away. "
            f"How many {things} does {name} have now?", a + b - c)


def _mul_add(rng: random.Random, name: str, things: str) -> tuple[str, int]:
    a, b, c = rng.randint(2, 5), rng.randint(2, 6), rng.randint(2, 9)
    return (f"{name} buys {a} bags with {b} {things} in each bag, and then finds {c} more {things}. "
            f"How many {things} does {name} have in total?", a * b + c)


TEMPLATES: tuple[Template, ...] = (_add, _sub, _mul, _div, _add_sub, _mul_add)


def make_problem(dataset: str, index: int, seed: int) -> Problem:
    """Problem ``index`` of a split, drawn from ``random.Random(seed)``; the template cycles with the index so
    every template is equally represented in any prefix of the split."""
    rng = random.Random(seed)
    template = TEMPLATES[index % len(TEMPLATES)]
    question, answer = template(rng, rng.choice(NAMES), rng.choice(THINGS))
    return Problem(dataset, "en", index, question, (str(answer),), meta={"template": template.__name__.lstrip("_")})


@dataclass
class Arith(MGSM):
    """Generated arithmetic word problems (English, integer answers); MGSM's extraction and scoring."""

    name: str = "arith"
    offset: int = 0

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        """The first ``limit`` problems of this split (all ``SPLIT_SIZE`` when None); ``data_dir`` is ignored."""
        wanted = {p.strip() for item in (langs or ()) for p in item.split(",") if p.strip()}
        if wanted - {"en", "all"}:
            raise ValueError(f"the arith set is English only (lang 'en'), not {','.join(sorted(wanted))!r}")
        if limit is not None and not 0 < limit <= SPLIT_SIZE:
            raise ValueError(f"--limit must be between 1 and {SPLIT_SIZE} for {self.name}")
        count = SPLIT_SIZE if limit is None else limit
        return [make_problem(self.name, i, self.offset + i) for i in range(count)]

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return prompts.chat(f"{problem.question}\n\n{INSTRUCTIONS['en']}", self.system)


def heldout() -> Arith:
    """The held-out split (``arith-heldout``)."""
    return Arith(name="arith-heldout", offset=HELDOUT_OFFSET)
