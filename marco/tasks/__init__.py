"""Datasets: MGSM (11 languages), zh→en translation (FLORES-200, WMT22) and the built-in demo set."""

from __future__ import annotations

from typing import Callable

from marco.tasks.arith import Arith, hard as arith_hard, heldout as arith_heldout, train as arith_train
from marco.tasks.base import DatasetInfo, Problem, Score, Task
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
    "arith-hard": arith_hard,  # harder held-out tier: 3-4 steps, larger numbers (issue 15)
    "arith-train": arith_train,  # training split: 50,000, no (template, numbers) of any evaluation split
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``: ``mgsm``, ``translation`` (or ``flores200`` / ``wmt22``) or ``demo``."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(TASK_NAMES)}") from None
    return factory()


def task_name(dataset: str, testset: str | None = None) -> str:
    """The registry name for ``--dataset`` plus ``--testset``: ``translation`` + ``wmt22`` is ``wmt22``."""
    if not testset:
        return dataset
    from marco.tasks.translation import CORPORA

    if dataset not in ("translation", *CORPORA):
        raise ValueError(f"--testset is for --dataset translation, not {dataset!r}")
    if testset not in CORPORA:
        raise ValueError(f"unknown --testset {testset!r}; choose one of {', '.join(CORPORA)}")
    return testset


def catalog(data_dir: str | None = None) -> list[DatasetInfo]:
    """What ``marco data list`` shows: every registered task's data, once each (``flores200`` and
    ``translation`` describe the same files). A task without a ``catalog`` method is loaded to count it."""
    seen: dict[tuple[str, str], DatasetInfo] = {}
    for name in TASK_NAMES:
        task = get_task(name)
        describe = getattr(task, "catalog", None)
        infos = describe(data_dir) if describe is not None else [_describe_by_loading(name, task, data_dir)]
        for info in infos:
            seen.setdefault((info.name, info.subset), info)
    return list(seen.values())


def _describe_by_loading(name: str, task: Task, data_dir: str | None) -> DatasetInfo:
    try:
        try:
            problems = task.load(data_dir, ["all"], None)
        except ValueError:  # a task without an "all" language
            problems = task.load(data_dir, None, None)
    except (ValueError, OSError) as exc:
        return DatasetInfo(name, "", None, "not available", "?", f"--dataset {name}", str(exc).splitlines()[0])
    langs = ",".join(sorted({p.lang for p in problems}))
    licence = str(getattr(task, "licence", "see the task's module"))
    return DatasetInfo(name, langs, len(problems), "built in", licence, f"--dataset {name}")


__all__ = [
    "DataError",
    "DatasetInfo",
    "Demo",
    "MGSM",
    "Problem",
    "Score",
    "TASK_NAMES",
    "Task",
    "Translation",
    "catalog",
    "default_data_dir",
    "get_task",
    "task_name",
]
