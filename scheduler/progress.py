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
