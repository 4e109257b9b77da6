"""Run a set of problems through the lockstep driver and summarise them per language.

This is the in-process path of ``marco run`` and ``marco solve``; the queue workers call the same driver
through :mod:`marco.jobs`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from marco.llm.base import Backend
from marco.search.base import SearchConfig, SearchResult
from marco.search.driver import DriverStats, LockstepDriver
from marco.search.sink import SearchSink
from marco.tasks.base import Problem, Task


@dataclass
class LangSummary:
    """One row of the results table."""

    lang: str
    problems: int
    failed: int
    metrics: dict[str, float]
    tokens_per_problem: float
    mean_confidence: float | None


@dataclass
class RunSummary:
    label: str
    rows: list[LangSummary]
    wall_s: float
    stats: DriverStats | None = None
    results: list[SearchResult] = field(default_factory=list)


def search_problems(
    backend: Backend,
    task: Task,
    problems: Sequence[Problem],
    config: SearchConfig,
    sink: SearchSink | None = None,
    search_ids: Sequence[str] | None = None,
    on_progress: Callable[[SearchResult], None] | None = None,
) -> tuple[list[SearchResult], DriverStats]:
    """Search every well-formed problem in lockstep; malformed ones are reported, not searched."""
    driver = LockstepDriver(backend, task, config, sink)
    results = driver.run(problems, search_ids=search_ids, on_progress=on_progress)
    return results, driver.stats


def summarize(task: Task, label: str, problems: Sequence[Problem], results: Sequence[SearchResult], wall_s: float,
              stats: DriverStats | None = None) -> RunSummary:
    """Per-language metrics (accuracy, or chrF/BLEU for translation), tokens per problem, confidence."""
    by_lang: dict[str, list[SearchResult]] = defaultdict(list)
    failed: dict[str, int] = defaultdict(int)
    for p in problems:
        if p.error:
            failed[p.lang] += 1
    for r in results:
        by_lang[r.problem.lang].append(r)
    rows = []
    for lang in sorted(set(by_lang) | set(failed)):
        rs = by_lang.get(lang, [])
        metrics = task.corpus_metrics([r.answer for r in rs], [r.problem for r in rs]) if rs else {}
        confs = [r.confidence for r in rs if r.confidence is not None]
        rows.append(LangSummary(
            lang=lang, problems=len(rs) + failed.get(lang, 0), failed=failed.get(lang, 0), metrics=metrics,
            tokens_per_problem=sum(r.tokens for r in rs) / len(rs) if rs else 0.0,
            mean_confidence=sum(confs) / len(confs) if confs else None,
        ))
    return RunSummary(label=label, rows=rows, wall_s=wall_s, stats=stats, results=list(results))


def run_problems(
    backend: Backend, task: Task, problems: Sequence[Problem], config: SearchConfig,
    sink: SearchSink | None = None, on_progress: Callable[[SearchResult], None] | None = None,
) -> RunSummary:
    """Search and summarise (the embedded path without a store)."""
    t0 = time.perf_counter()
    good = [p for p in problems if not p.error]
    results, stats = search_problems(backend, task, good, config, sink, on_progress=on_progress)
    return summarize(task, config.label, problems, results, time.perf_counter() - t0, stats)
