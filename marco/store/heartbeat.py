"""A running job's heartbeat: renew its lease from a thread, and tell the job when to stop.

The lease must outlive anything a job does between two writes (a model load, a long round), so it is
renewed by a daemon thread every ``lease_s / 3`` seconds, independent of the job's own progress, under the
claim's fencing token (:mod:`marco.store.fence`). Between rounds the job asks :meth:`Heartbeat.check`
whether it should go on; it stops with

- :class:`JobCancelled` once its batch was cancelled (checked every round, in the round's transaction);
- :class:`LeaseLost` once its claim no longer holds the job (renewals failed for longer than the lease,
  e.g. the database was away, and the job was requeued or another worker took it): counted in
  ``jobs.lease_losses``, never reported as a worker death. Every write of the job's results checks the
  token in its own transaction, so a lost claim never commits, whatever this thread has seen;
- :class:`ShutdownRequested` once the worker was asked to stop (SIGTERM): the round just written is kept,
  the job goes back to the queue for another worker;
- :class:`NoProgress` once the job reported no progress (:meth:`Heartbeat.progress`) for
  ``progress_timeout_s``: the heartbeat stops renewing and fails the job with that reason (a hung model
  call, a deadlock), on every pool, since it needs no signal and no time limit from Celery.

Long jobs (synthesis, training) that do not pass through a round run inside :meth:`Heartbeat.interrupting`:
the heartbeat then raises the stop in their thread itself, within one renewal period of the loss (a
renewal that finds another claim, or no renewal for a whole lease, which is when another worker may take
the job).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from typing import Any, Iterator

from marco.shutdown import SHUTDOWN  # set by the worker process on SIGTERM (warm shutdown)
from marco.store.fence import Fence, JobCancelled, JobStopped, LeaseLost
from marco.store.urls import one_line

log = logging.getLogger(__name__)

__all__ = ["SHUTDOWN", "Heartbeat", "JobCancelled", "JobStopped", "LeaseLost", "NoProgress", "ShutdownRequested"]


class ShutdownRequested(JobStopped):
    """The worker is shutting down: hand the job back."""


class NoProgress(JobStopped):
    """The job reported no progress for longer than its progress timeout; the heartbeat ended it."""


class Heartbeat:
    """Renews ``job_id``'s lease every ``period_s`` (default ``lease_s / 3``) while in its ``with`` block.

    ``state`` is ``held``, ``lost``, ``cancelled``, ``stalled`` (no progress: the job was failed) or
    ``ended`` (the job was finished or failed by this claim itself: a renewal after that is no loss). A
    renewal that fails with a database error is retried next period; once none succeeded for a whole
    lease, the claim counts as lost (``expired``) without asking the database.
    """

    def __init__(
        self, store: Any, job_id: str, worker: str, lease_s: float, period_s: float | None = None,
        token: int | None = None, progress_timeout_s: float | None = None,
    ) -> None:  # fmt: skip
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s
        self.token = token
        self.period_s = period_s if period_s is not None else max(0.2, lease_s / 3)
        self.progress_timeout_s = progress_timeout_s or None
        self.state = "held"
        self.failed_renewals = 0
        self._noted = False
        self._renewed_at = self._progress_at = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._target: int | None = None  # thread id to interrupt on a stop (long jobs)
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True)

    @property
    def fence(self) -> Fence | None:
        """The claim's :class:`Fence` (None without a token: an old caller)."""
        return None if self.token is None else Fence(self.job_id, self.worker, self.token)

    # --- the renewing thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.progress_timeout_s and time.monotonic() - self._progress_at > self.progress_timeout_s:
                self._stalled()
                return
            try:
                if self.store.renew_lease(self.job_id, self.worker, self.lease_s, token=self.token):
                    self.failed_renewals = 0
                    self._renewed_at = time.monotonic()
                    continue
                self._lost_or_cancelled()
                return
            except Exception as exc:  # the database blinked: try again next period
                self.failed_renewals += 1
                log.warning("job %s: lease renewal failed (%s)", self.job_id, one_line(exc))
                if time.monotonic() - self._renewed_at > self.lease_s:
                    # the lease ran out unrenewed: another worker may own the job by now; a long job stops
                    # here (its writes would be refused anyway), a lockstep job at its next fenced write
                    log.warning("job %s: no renewal for over %.0fs; stopping this claim", self.job_id, self.lease_s)
                    self._interrupt(LeaseLost)

    def _lost_or_cancelled(self) -> None:
        lease = self.store.job_lease(self.job_id)
        ours = lease is not None and (self.token is None or lease[2] == self.token)
        if lease is not None and lease[0] == "cancelled":
            self.state = "cancelled"
            self._interrupt(JobCancelled)
        elif ours and lease is not None and lease[0] in ("done", "failed"):
            self.state = "ended"  # this claim ended the job between its last write and leaving this block
        elif lease is None or lease[1] != self.worker or lease[0] != "running" or not ours:
            self.state = "lost"
            self.note_lost()
            log.warning("job %s: lease lost while this worker (%s) was alive; another worker owns it", self.job_id, self.worker)
            self._interrupt(LeaseLost)

    def _stalled(self) -> None:
        reason = (
            f"no progress for over {self.progress_timeout_s:.0f}s (MARCO_PROGRESS_TIMEOUT): the job was ended and "
            f"its lease no longer renewed; its worker {self.worker} is hung or the job is too slow"
        )
        try:
            ended = self.store.fail_job(self.job_id, reason, worker=self.worker, token=self.token)
        except Exception as exc:  # the database is away too: the lease runs out and the scheduler requeues it
            log.warning("job %s: could not record no progress (%s)", self.job_id, one_line(exc))
            ended = False
        self.state = "stalled"
        log.error("job %s: %s%s", self.job_id, reason, "" if ended else " (not recorded: the claim was gone)")
        self._interrupt(NoProgress)

    def _interrupt(self, exc: type[BaseException]) -> None:
        with self._lock:
            if self._target is not None and not self._stop.is_set():
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(exc))
                self._target = None

    # --- what the job calls ----------------------------------------------------------------------------
    def progress(self) -> None:
        """The job moved on (a round written, a training step): the progress clock restarts."""
        self._progress_at = time.monotonic()

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Inside this block the heartbeat raises the stop (LeaseLost, JobCancelled, NoProgress) in the calling
        thread as soon as it sees it: for long steps that never call :meth:`check` (synthesis, training).
        Wrap the block in the ``try`` that handles those (a stop may surface as the block ends)."""
        self.check()
        with self._lock:
            self._target = threading.get_ident()
        try:
            yield
        finally:
            with self._lock:
                target, self._target = self._target, None
            if target is not None:  # a stop set just now must not surface after the block
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
        self.check()

    def check(self, session: Any = None) -> None:
        """Raise when the job must stop (see the module docstring). With ``session`` the claim's fence is
        checked in that transaction too (a share lock on the job's row until it commits), so a cancel or a
        takeover is seen within one round whatever the renewal period, and nothing commits after one."""
        if self.state == "cancelled":
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if self.state == "stalled":
            raise NoProgress(f"job {self.job_id}: no progress for over {self.progress_timeout_s:.0f}s; ended")
        if self.state == "lost":
            raise LeaseLost(
                f"job {self.job_id}: lease lost while its worker {self.worker} was alive "
                f"(renewals failed for over {self.lease_s:.0f}s); another worker owns it now"
            )
        if session is None:
            return
        fence = self.fence or Fence(self.job_id, self.worker, -1)
        if self.token is None:  # no token (an old caller): compare the holder only
            from sqlalchemy import select

            from marco.store.models import Job

            row = session.execute(select(Job.status, Job.worker).where(Job.id == self.job_id)).one_or_none()
            if row is not None and row.status == "cancelled":
                self.state = "cancelled"
            elif row is None or row.worker != self.worker or row.status != "running":
                self.state = "lost"
            self.check()
            return
        try:
            fence.check(session)
        except JobCancelled:
            self.state = "cancelled"
            raise
        except LeaseLost:
            self.state = "lost"  # counted by note_lost() once this transaction has rolled back
            self.check()

    def note_lost(self) -> None:
        """Count this lease loss in ``jobs.lease_losses`` (once)."""
        if not self._noted:
            self._noted = True
            try:
                self.store.note_lease_lost(self.job_id)
            except Exception as exc:  # a count for the operator: the database may be away still
                log.warning("job %s: lease loss not counted (%s)", self.job_id, one_line(exc))

    def check_shutdown(self) -> None:
        if SHUTDOWN.is_set():
            raise ShutdownRequested(f"job {self.job_id}: worker {self.worker} is shutting down")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._stop.set()
            target, self._target = self._target, None
        if target is not None:  # a stop raised just as the job left its block must not surface later
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
        self._thread.join(timeout=5)
