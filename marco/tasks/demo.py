"""A built-in set of short arithmetic word problems, so the main job runs with no data directory.

Written for this project (not taken from any dataset); one or two operations on small integers, easy enough
that a 135M model sometimes gets one right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from marco import prompts
from marco.tasks.base import DatasetInfo, Problem
from marco.tasks.mgsm import INSTRUCTIONS, MGSM

DEMO_PROBLEMS: tuple[tuple[str, int], ...] = (
    ("Tom has 3 apples. He buys 2 more apples. How many apples does Tom have now?", 5),
    ("A box holds 6 eggs. How many eggs are in 2 boxes?", 12),
    ("Sara had 10 candies and gave 4 of them to her friend. How many candies does Sara have left?", 6),
    ("There are 5 birds on a tree. 3 more birds land on the tree. How many birds are on the tree now?", 8),
    ("One pencil costs 2 dollars. How many dollars do 4 pencils cost?", 8),
    ("Ben reads 7 pages on Monday and 8 pages on Tuesday. How many pages does he read in total?", 15),
    ("A class has 20 students. Half of them walk to school. How many students walk to school?", 10),
    ("Lily is 9 years old. Her brother is 4 years older than Lily. How old is her brother?", 13),
)


@dataclass
class Demo(MGSM):
    """The demo set: English, integer answers; MGSM's extraction and scoring (inherited)."""

    name: str = "demo"

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        """Every demo problem (the first ``limit`` of them); ``data_dir`` is ignored."""
        wanted = {p.strip() for item in (langs or ()) for p in item.split(",") if p.strip()}
        if wanted - {"en", "all"}:
            raise ValueError(f"the demo set is English only (lang 'en'), not {','.join(sorted(wanted))!r}")
        rows = DEMO_PROBLEMS if limit is None else DEMO_PROBLEMS[:limit]
        return [Problem(self.name, "en", i, q, (str(a),)) for i, (q, a) in enumerate(rows)]

    def catalog(self, data_dir: str | None) -> list[DatasetInfo]:
        return [DatasetInfo(self.name, "en", len(DEMO_PROBLEMS), "built in", "Apache-2.0 (written for marco)",
                            f"--dataset {self.name}")]  # fmt: skip

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return prompts.chat(f"{problem.question}\n\n{INSTRUCTIONS['en']}", self.system)
