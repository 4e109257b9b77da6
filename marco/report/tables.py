"""The paper-style table of a batch: rows strategy/action label, columns languages, plus cost."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from marco.store.models import Batch
from marco.store.store import Store, problem_from_row
from marco.tasks import get_task


@dataclass
class ReportRow:
    label: str
    cells: dict[str, float | None]  # lang -> headline metric
    overall: float | None
    metrics: dict[str, dict[str, float]]  # lang -> every corpus metric
    problems: int
    failed: int
    tokens_per_problem: float
    seconds_per_problem: float


@dataclass
class BatchReport:
    batch_id: str
    name: str
    dataset: str | None
    status: str
    metric: str  # the headline metric: accuracy (MGSM) or chrf (translation)
    langs: list[str]
    rows: list[ReportRow] = field(default_factory=list)
    wall_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _headline(metrics: dict[str, float]) -> str:
    for name in ("accuracy", "chrf"):
        if name in metrics:
            return name
    return next(iter(metrics), "accuracy")


def batch_report(store: Store, batch_id: str) -> BatchReport:
    """Corpus metrics per (label, language) from the task's own scorer, tokens and time per problem."""
    batch: Batch = store.get_batch(batch_id)
    pairs = store.batch_rows(batch_id)
    task = get_task(batch.config.get("task") or batch.dataset or "mgsm")
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for search, problem in pairs:
        groups[search.label][search.lang].append((search, problem))
    langs = sorted({s.lang for s, _ in pairs})
    report = BatchReport(batch_id=str(batch.id), name=batch.name, dataset=batch.dataset, status=batch.status,
                         metric="accuracy", langs=langs)
    if batch.started_at and batch.finished_at:
        report.wall_s = (batch.finished_at - batch.started_at).total_seconds()
    for label in sorted(groups):
        cells: dict[str, float | None] = {}
        metrics: dict[str, dict[str, float]] = {}
        every: list = []
        failed = 0
        for lang in langs:
            done = [(s, p) for s, p in groups[label].get(lang, []) if s.status == "done"]
            failed += sum(1 for s, _ in groups[label].get(lang, []) if s.status == "failed")
            every.extend(done)
            if not done:
                cells[lang] = None
                continue
            m = task.corpus_metrics([s.final_answer for s, _ in done], [problem_from_row(p) for _, p in done])
            report.metric = _headline(m)
            metrics[lang] = m
            cells[lang] = m.get(report.metric)
        overall = None
        if every:
            m = task.corpus_metrics([s.final_answer for s, _ in every], [problem_from_row(p) for _, p in every])
            overall = m.get(_headline(m))
        n = len(every)
        report.rows.append(ReportRow(
            label=label, cells=cells, overall=overall, metrics=metrics, problems=n, failed=failed,
            tokens_per_problem=sum(s.tokens for s, _ in every) / n if n else 0.0,
            seconds_per_problem=sum(s.elapsed_s for s, _ in every) / n if n else 0.0,
        ))
    return report


def format_metric(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric == "accuracy" else f"{value:.1f}"
