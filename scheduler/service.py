"""The scheduler: re-enqueue jobs whose lease expired, close finished batches, chain pipeline stages.

Everything it decides comes from counting rows in the store, so any number of schedulers (or none, for
a while) is safe: a job is moved back to ``queued`` by one conditional UPDATE, and a batch is handed to
its stage handlers once, when this scheduler is the one that closed it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from scheduler import stages
from scheduler.dispatch import Dispatcher

log = logging.getLogger("marco.scheduler")

STAGED = "_stages_run"  # set in `batches.config` once the batch's stage handlers ran


@dataclass(frozen=True)
class SchedulerConfig:
    """``interval_s`` between ticks; a job whose worker died ``max_attempts`` times fails for good; a job
    ``queued`` for ``stale_queued_s`` since its message was sent, and never claimed, is sent again (its
    message was lost: Redis restarted without persistence, failed over or was flushed)."""

    interval_s: float = 10.0
    max_attempts: int = 5
    stale_queued_s: float = 300.0
    stage_window_s: float = 7 * 24 * 3600.0  # how far back to look for ended batches


@dataclass
class TickReport:
    """What one tick did."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    closed_batches: list[str] = field(default_factory=list)
    stage_jobs: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.resent or self.failed or self.closed_batches or self.stage_jobs)


def _ids(ids: list[str], show: int = 10) -> str:
    """The first ``show`` ids for a log line (a flushed broker can strand thousands)."""
    return ", ".join(ids[:show]) + (f" and {len(ids) - show} more" if len(ids) > show else "")


class Scheduler:
    def __init__(self, store: Any, dispatcher: Dispatcher, config: SchedulerConfig | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.config = config or SchedulerConfig()

    def tick(self) -> TickReport:
        """One pass: lost messages, expired leases, finished batches, next stages."""
        report = TickReport()
        stranded = self.store.resend_stranded(self.config.stale_queued_s)
        if stranded:
            # `enqueued_at` already moved forward: should this send fail, the next step of the back-off retries.
            self.dispatcher.enqueue(stranded)
            report.resent = [job_id for job_id, _ in stranded]
            log.warning(
                "re-sent %d job(s) queued for over %.0fs with no claim (their message was lost?): %s",
                len(stranded), self.config.stale_queued_s, _ids(report.resent),
            )
        requeued, report.failed = self.store.requeue_expired(self.config.max_attempts)
        if requeued:
            # The jobs are `queued` in the store before their message exists: should this send fail,
            # they stay queued and a later tick re-sends them as stranded (or `marco retry` does).
            self.dispatcher.enqueue(requeued)
            report.requeued = [job_id for job_id, _ in requeued]
            log.warning("re-enqueued %d job(s) whose lease expired: %s", len(requeued), _ids(report.requeued))
        for job_id in report.failed:
            log.error("job %s failed: its worker died %d times", job_id, self.config.max_attempts)
        self.store.refresh_batches()
        # Batches closed by the workers themselves (the last job's finish closes its batch) count too:
        # every ended batch runs its stage handlers exactly once.
        for batch_id in self._ended_unstaged():
            jobs = self._run_stages(batch_id)
            if jobs is not None:
                report.closed_batches.append(batch_id)
                report.stage_jobs.extend(job_id for job_id, _ in jobs)
        return report

    def _ended_unstaged(self) -> list[str]:
        from datetime import datetime, timedelta, timezone

        from sqlalchemy import select

        from marco.store.models import Batch

        since = datetime.now(timezone.utc) - timedelta(seconds=self.config.stage_window_s)
        with self.store.sessions() as s:
            rows = s.execute(
                select(Batch.id, Batch.config).where(
                    Batch.status.in_(("done", "failed", "cancelled")), Batch.finished_at >= since
                )
            ).all()
        return [str(r.id) for r in rows if not (r.config or {}).get(STAGED)]

    def _run_stages(self, batch_id: str) -> list[tuple[str, str]] | None:
        """Run the handlers of an ended batch under a row lock; None when another scheduler did it.

        The flag is committed only after the next stage's jobs are enqueued, so a failure retries the
        whole step next tick (handlers plan with deterministic ids, which makes a retry a no-op write).
        """
        from sqlalchemy import select

        from marco.store.models import Batch

        with self.store.sessions.begin() as s:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id).with_for_update())
            if batch is None or (batch.config or {}).get(STAGED):
                return None
            jobs = list(stages.on_batch_end(self.store, batch))
            if jobs:
                self.dispatcher.enqueue(jobs, priority=batch.priority)
            batch.config = {**(batch.config or {}), STAGED: True}
        return jobs

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick every ``interval_s`` until ``stop()``; a failing tick is logged and retried next time."""
        while not stop():
            started = time.monotonic()
            try:
                report = self.tick()
                if report:
                    log.info(
                        "tick: %d requeued, %d re-sent, %d failed, %d batch(es) ended, %d stage job(s)",
                        len(report.requeued), len(report.resent), len(report.failed), len(report.closed_batches), len(report.stage_jobs),
                    )
            except Exception as exc:  # the database or broker blinked: keep serving
                log.error("scheduler tick failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            time.sleep(max(0.0, self.config.interval_s - (time.monotonic() - started)))
