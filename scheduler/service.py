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
from scheduler.dispatch import UNACKED, Dispatcher, queue_for_kind

log = logging.getLogger("marco.scheduler")

STAGED = "_stages_run"  # set in `batches.config` once the batch's stage handlers ran


@dataclass(frozen=True)
class SchedulerConfig:
    """``interval_s`` between ticks; a job whose worker died ``max_attempts`` times fails for good; a job
    ``queued`` for ``stale_queued_s`` since its message was sent, and never claimed, is sent again when the
    broker holds fewer messages than there are queued jobs (its message was lost: Redis restarted without
    persistence, failed over or was flushed); a long queue alone re-sends nothing."""

    interval_s: float = 10.0
    max_attempts: int = 5
    stale_queued_s: float = 300.0
    stage_window_s: float = 7 * 24 * 3600.0  # how far back to look for ended batches
    max_resend_per_tick: int = 10_000  # a flushed broker's whole backlog comes back over a few ticks


@dataclass
class TickReport:
    """What one tick did."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    closed_batches: list[str] = field(default_factory=list)
    stage_jobs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # phases that raised (logged; the others still ran)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.resent or self.failed or self.closed_batches or self.stage_jobs)


def _one_line(exc: BaseException) -> str:
    from marco.store.urls import one_line

    return one_line(exc)


def _ids(ids: list[str], show: int = 10) -> str:
    """The first ``show`` ids for a log line (a flushed broker can strand thousands)."""
    return ", ".join(ids[:show]) + (f" and {len(ids) - show} more" if len(ids) > show else "")


class Scheduler:
    def __init__(self, store: Any, dispatcher: Dispatcher, config: SchedulerConfig | None = None) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.config = config or SchedulerConfig()
        self.export_gauges = True  # the queue gauges cost one grouped read of open jobs per tick
        self.last_tick_s = 0.0

    def tick(self) -> TickReport:
        """One pass: lost messages, expired leases, finished batches, next stages; then the queue gauges.
        Each phase runs on its own: one that raises (the broker away, a stage handler's bug) is logged and the
        others still run, so a problem in one never stops the recovery of expired leases."""
        from marco import metrics
        from scheduler.progress import export_fleet, fleet_snapshot

        started = time.perf_counter()
        report = self._tick()
        metrics.RESENDS.inc(len(report.resent))
        metrics.REQUEUED.inc(len(report.requeued))
        metrics.JOBS_FAILED_DEATHS.inc(len(report.failed))
        if self.export_gauges:
            try:
                export_fleet(fleet_snapshot(self.store))
            except Exception as exc:
                report.errors.append(f"export gauges: {_one_line(exc)}")
                log.exception("scheduler: export gauges failed: %s", _one_line(exc))
        self.last_tick_s = time.perf_counter() - started
        metrics.TICK_SECONDS.observe(self.last_tick_s)
        return report

    def _tick(self) -> TickReport:
        report = TickReport()
        for name, phase in (
            ("re-send lost messages", self._resend),
            ("requeue expired leases", self._requeue),
            ("close batches", self._close),
            ("run stages", self._stages),
        ):
            try:
                phase(report)
            except Exception as exc:
                report.errors.append(f"{name}: {_one_line(exc)}")
                log.exception("scheduler: %s failed: %s", name, _one_line(exc))
        return report

    def _evidence(self) -> tuple[dict[str, int] | None, list[str]]:
        """``{kind: how many of its queued jobs the broker holds no message for}``, or None when the broker
        cannot count (the age alone decides then). A long queue is not a lost one: a job waiting behind
        100,000 others is held by the broker and not re-sent. Also the queued jobs whose message a worker
        holds right now (delivered, not yet claimed): those are never the lost ones."""
        held_fn = getattr(self.dispatcher, "held", None)
        held = held_fn() if held_fn is not None else None
        if held is None:
            return None, []
        queued = self.store.queued_counts()
        # A delivered, unacknowledged message covers its job only while that job is still queued and the
        # delivery is recent: a live worker claims what it was handed within seconds (prefetch 1, acks late),
        # so an older one was handed to a worker that died before claiming it, and a job that was requeued
        # and done since is covered by nothing. Sending such a job again is safe: claims are exclusive.
        # No ids readable: trust the count.
        unacked_fn = getattr(self.dispatcher, "unacked_jobs", None)
        unacked_ids = unacked_fn(self.config.stale_queued_s) if unacked_fn is not None else None
        covered: dict[str, int] = {}
        in_hand: list[str] = []
        if unacked_ids:
            for kind, ids in self.store.queued_among(unacked_ids).items():
                covered[queue_for_kind(kind)] = covered.get(queue_for_kind(kind), 0) + len(ids)
                in_hand.extend(ids)
        per_queue: dict[str, int] = {}
        for kind, n in queued.items():
            per_queue[queue_for_kind(kind)] = per_queue.get(queue_for_kind(kind), 0) + n
        missing: dict[str, int] = {}
        for kind, n in queued.items():
            queue = queue_for_kind(kind)
            in_flight = covered.get(queue, 0) if unacked_ids is not None else held.get(UNACKED, 0)
            deficit = per_queue[queue] - held.get(queue, 0) - in_flight
            if deficit > 0:
                missing[kind] = min(n, deficit)
        return missing, in_hand

    def _send(self, jobs: list[tuple[str, str]]) -> None:
        """Send ``jobs`` again with their batch's priority (one enqueue per priority)."""
        priorities = self.store.job_priorities([job_id for job_id, _ in jobs])
        by_priority: dict[int, list[tuple[str, str]]] = {}
        for job_id, kind in jobs:
            by_priority.setdefault(priorities.get(job_id, 0), []).append((job_id, kind))
        for priority, group in sorted(by_priority.items(), reverse=True):
            self.dispatcher.enqueue(group, priority=priority)

    def _resend(self, report: TickReport) -> None:
        evidence, in_hand = self._evidence()
        if evidence is not None and not evidence:
            return  # the broker holds a message for every queued job
        stranded = self.store.resend_stranded(
            self.config.stale_queued_s, limits=evidence, max_jobs=self.config.max_resend_per_tick, skip=in_hand
        )
        if stranded:
            # `enqueued_at` already moved forward: should this send fail, the next step of the back-off retries.
            self._send(stranded)
            report.resent = [job_id for job_id, _ in stranded]
            log.warning(
                "re-sent %d job(s) queued for over %.0fs with no claim and no message in the broker (lost?): %s",
                len(stranded), self.config.stale_queued_s, _ids(report.resent),
            )

    def _requeue(self, report: TickReport) -> None:
        requeued, report.failed = self.store.requeue_expired(self.config.max_attempts)
        for job_id in report.failed:
            log.error("job %s failed: its worker died %d times", job_id, self.config.max_attempts)
        if requeued:
            report.requeued = [job_id for job_id, _ in requeued]
            # The jobs are `queued` in the store before their message exists: should this send fail,
            # they stay queued and a later tick re-sends them as stranded (or `marco retry` does).
            self._send(requeued)
            log.warning("re-enqueued %d job(s) whose lease expired: %s", len(requeued), _ids(report.requeued))

    def _close(self, report: TickReport) -> None:
        self.store.refresh_batches()

    def _stages(self, report: TickReport) -> None:
        # Batches closed by the workers themselves (the last job's finish closes its batch) count too:
        # every ended batch runs its stage handlers exactly once.
        for batch_id in self._ended_unstaged():
            jobs = self._run_stages(batch_id)
            if jobs is not None:
                report.closed_batches.append(batch_id)
                report.stage_jobs.extend(job_id for job_id, _ in jobs)

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
                log.error("scheduler tick failed: %s", _one_line(exc))
            time.sleep(max(0.0, self.config.interval_s - (time.monotonic() - started)))
