"""The product's default MCTS batch, the one the throughput benchmarks time: MGSM-en problems (the demo set
where no data is installed), ``mcts`` with ``ministep:32`` actions, k children, seed 1."""

from __future__ import annotations

from typing import Any

from marco.search.base import SearchConfig
from marco.tasks import default_data_dir, get_task


def mcts_batch(problems: int, budget: int = 1024, rollout: int = 384, children: int = 3) -> tuple[Any, list[Any], SearchConfig]:
    """``(task, problems, config)``: the first ``problems`` MGSM-en problems and the search config."""
    data = default_data_dir()
    task = get_task("mgsm" if data else "demo")
    loaded = task.load(data, ["en"], problems) if data else task.load(None, None, problems)
    config = SearchConfig(strategy="mcts", action="ministep:32", budget=budget, children=children,
                          max_answer_tokens=rollout, seed=1)
    return task, loaded, config


def dataset_name() -> str:
    """``mgsm``, or ``demo`` where no data is installed (for the benchmarks' headers)."""
    return "mgsm" if default_data_dir() else "demo"
