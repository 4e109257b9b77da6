"""Batch progress for ``marco status`` and ``marco submit --wait``: counts from the store, rates, ETA."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

ENDED = ("done", "failed", "cancelled")


@dataclass
class Snapshot:
    """One batch at one moment."""

    batch_id: str
    name: str
    kind: str
    status: str
    jobs: dict[str, int]
    searches_total: int
    searches_ended: int
    solved: int
    correct: int
    scored: int
    tokens: int
    elapsed_s: float
    resent: int = 0  # jobs' messages the scheduler re-sent (lost by the broker)
    lease_losses: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def searches_per_min(self) -> float:
        return 60.0 * self.searches_ended / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.searches_total - self.searches_ended
        if self.status in ENDED or left <= 0:
            return 0.0
        rate = self.searches_ended / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return left / rate if rate > 0 else None

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id, "name": self.name, "kind": self.kind, "status": self.status,
            "jobs": self.jobs, "searches": self.searches_total, "searches_ended": self.searches_ended,
            "solved": self.solved, "correct": self.correct, "accuracy": self.accuracy, "tokens": self.tokens,
            "elapsed_s": round(self.elapsed_s, 3), "searches_per_min": round(self.searches_per_min, 3),
            "tokens_per_s": round(self.tokens_per_s, 3), "eta_s": self.eta_s,
            "resent": self.resent, "lease_losses": self.lease_losses,
        }


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def snapshot(store: Any, batch_id: str) -> Snapshot:
    progress = store.batch_progress(batch_id)
    batch = store.get_batch(batch_id)
    start = _aware(batch.started_at)
    end = _aware(batch.finished_at) or datetime.now(timezone.utc)
    elapsed = (end - start).total_seconds() if start else 0.0
    return Snapshot(
        batch_id=batch_id,
        name=batch.name,
        kind=batch.kind,
        status=progress.status,
        jobs={k: progress.jobs.get(k, 0) for k in ("queued", "running", "done", "failed", "cancelled")},
        searches_total=sum(progress.searches.values()),
        searches_ended=sum(progress.searches.get(k, 0) for k in ENDED),
        solved=progress.solved,
        correct=progress.correct,
        scored=progress.scored,
        tokens=progress.tokens,
        elapsed_s=max(0.0, elapsed),
        resent=progress.resent,
        lease_losses=progress.lease_losses,
    )


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "?"
    eta = int(eta)
    return f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"


def table(snaps: list[Snapshot]) -> Any:
    """A rich table, one row per batch."""
    from rich.table import Table

    t = Table(show_lines=False)
    for col in ("batch", "name", "status", "queued", "running", "done", "failed", "searches", "accuracy", "tokens", "tok/s", "ETA", "resent"):
        t.add_column(col, justify="right" if col not in ("batch", "name", "status") else "left")
    for s in snaps:
        t.add_row(
            s.batch_id[:8], s.name[:24], s.status,
            *(str(s.jobs.get(k, 0)) for k in ("queued", "running", "done", "failed")),
            f"{s.searches_ended}/{s.searches_total}",
            "-" if s.accuracy is None else f"{s.accuracy:.1%}",
            str(s.tokens), f"{s.tokens_per_s:.1f}", _fmt_eta(s.eta_s),
            str(s.resent) + (f" ({s.lease_losses} lease lost)" if s.lease_losses else ""),
        )
    return t


# --- the fleet: the queue's headline numbers, the same ones the scheduler exports as metrics ------------
@dataclass
class QueueLine:
    """One queue right now: jobs queued and running, and how long the oldest queued one has waited."""

    queue: str
    queued: int = 0
    running: int = 0
    oldest_age_s: float = 0.0


@dataclass
class FleetSnapshot:
    """Every queue, the workers holding leases, and the re-sends and lease losses of open batches."""

    queues: dict[str, QueueLine]
    workers: int
    resent: int
    lease_losses: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": {q: {"queued": l.queued, "running": l.running, "oldest_age_s": round(l.oldest_age_s, 1)} for q, l in self.queues.items()},
            "workers": self.workers, "resent": self.resent, "lease_losses": self.lease_losses,
        }


def fleet_snapshot(store: Any) -> FleetSnapshot:
    """Read from the jobs table (queued and running rows only, through the ``(status, lease_until)``
    index), so it stays cheap with millions of ended jobs."""
    from sqlalchemy import func, select

    from marco.store.models import Job
    from worker.settings import QUEUE_FOR_TASK, QUEUES, TASK_FOR_KIND

    now = datetime.now(timezone.utc)
    lines = {q: QueueLine(q) for q in QUEUES}
    with store.sessions() as s:
        rows = s.execute(
            select(Job.kind, Job.status, func.count(), func.min(func.coalesce(Job.enqueued_at, Job.created_at)),
                   func.sum(Job.resends), func.sum(Job.lease_losses))
            .where(Job.status.in_(("queued", "running")))
            .group_by(Job.kind, Job.status)
        ).all()
        workers = s.scalar(select(func.count(func.distinct(Job.worker))).where(Job.status == "running")) or 0
    resent = losses = 0
    for kind, status, n, oldest, res, lost in rows:
        queue = QUEUE_FOR_TASK.get(TASK_FOR_KIND.get(kind, ""), kind)
        line = lines.setdefault(queue, QueueLine(queue))
        resent += int(res or 0)
        losses += int(lost or 0)
        if status == "queued":
            line.queued += n
            if oldest is not None:
                line.oldest_age_s = max(line.oldest_age_s, (now - _aware(oldest)).total_seconds())
        else:
            line.running += n
    return FleetSnapshot(lines, int(workers), resent, losses)


def export_fleet(snap: FleetSnapshot) -> None:
    """Set the queue gauges (``marco_queue_depth`` ...) from ``snap``."""
    from marco import metrics

    for q, line in snap.queues.items():
        metrics.QUEUE_DEPTH.labels(q).set(line.queued)
        metrics.QUEUE_OLDEST_AGE.labels(q).set(line.oldest_age_s)
        metrics.JOBS_RUNNING.labels(q).set(line.running)
    metrics.WORKERS_ACTIVE.set(snap.workers)


def _fmt_age(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def fleet_table(snap: FleetSnapshot) -> Any:
    """A rich table: per queue, queued / running / oldest queued; the caption holds workers and losses."""
    from rich.table import Table

    t = Table(title="queues", caption=(f"{snap.workers} worker(s) holding leases · {snap.resent} message(s) re-sent · "
                                       f"{snap.lease_losses} lease(s) lost (open jobs)"))
    for col in ("queue", "queued", "running", "oldest queued"):
        t.add_column(col, justify="left" if col == "queue" else "right")
    for line in snap.queues.values():
        t.add_row(line.queue, str(line.queued), str(line.running), _fmt_age(line.oldest_age_s) if line.queued else "-")
    return t
