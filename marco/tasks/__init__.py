"""Datasets: MGSM (11 languages), zh→en translation (FLORES-200, WMT22) and the built-in demo set."""

from __future__ import annotations

from typing import Callable

from marco.tasks.arith import Arith, heldout as arith_heldout
from marco.tasks.base import Problem, Score, Task
from marco.tasks.data import DataError, default_data_dir
from marco.tasks.demo import Demo
from marco.tasks.mgsm import MGSM
from marco.tasks.translation import Translation

# "flores200" and "wmt22" are the `Problem.dataset` names of translation problems, so that
# `get_task(problem.dataset)` works for every stored problem; they also pick that corpus from a parent folder.
_TASKS: dict[str, Callable[[], Task]] = {
    "mgsm": MGSM,
    "translation": Translation,
    "demo": Demo,
    "flores200": lambda: Translation(corpus="flores200"),
    "wmt22": lambda: Translation(corpus="wmt22"),
    "arith": Arith,  # generated tuning set (issue 8); "arith-heldout" is its held-out split
    "arith-heldout": arith_heldout,
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``: ``mgsm``, ``translation`` (or ``flores200`` / ``wmt22``) or ``demo``."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(TASK_NAMES)}") from None
    return factory()


__all__ = [
    "DataError",
    "Demo",
    "MGSM",
    "Problem",
    "Score",
    "TASK_NAMES",
    "Task",
    "Translation",
    "default_data_dir",
    "get_task",
]
