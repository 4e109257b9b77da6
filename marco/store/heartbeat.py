"""A running job's heartbeat: renew its lease from a thread, and tell the job when to stop.

The lease must outlive anything a job does between two writes (a model load, a long round), so it is
renewed by a daemon thread every ``lease_s / 3`` seconds, independent of the job's own progress. Between
rounds the job asks :meth:`Heartbeat.check` whether it should go on; it stops with

- :class:`JobCancelled` once its batch was cancelled (checked every round, in the round's transaction);
- :class:`LeaseLost` once its lease is gone while this worker was alive (renewals failed for longer than
  the lease, e.g. the database was away, and another worker took the job): counted in
  ``jobs.lease_losses``, never reported as a worker death;
- :class:`ShutdownRequested` once the worker was asked to stop (SIGTERM): the round just written is kept,
  the job goes back to the queue for another worker.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from marco.shutdown import SHUTDOWN  # set by the worker process on SIGTERM (warm shutdown)

log = logging.getLogger(__name__)

__all__ = ["SHUTDOWN", "Heartbeat", "JobCancelled", "JobStopped", "LeaseLost", "ShutdownRequested"]


class JobStopped(Exception):
    """A job stopped before its end for a reason that is not its own failure."""


class LeaseLost(JobStopped, RuntimeError):
    """Another worker took over this job (our lease expired); stop writing."""


class JobCancelled(JobStopped):
    """The job's batch was cancelled."""


class ShutdownRequested(JobStopped):
    """The worker is shutting down: hand the job back."""


class Heartbeat:
    """Renews ``job_id``'s lease every ``period_s`` (default ``lease_s / 3``) while in its ``with`` block.

    ``state`` is ``held``, ``lost`` or ``cancelled``; a renewal that fails with a database error is retried
    next period (the lease has slack for two missed renewals).
    """

    def __init__(self, store: Any, job_id: str, worker: str, lease_s: float, period_s: float | None = None) -> None:
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s
        self.period_s = period_s if period_s is not None else max(0.2, lease_s / 3)
        self.state = "held"
        self.failed_renewals = 0
        self._noted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                if self.store.renew_lease(self.job_id, self.worker, self.lease_s):
                    self.failed_renewals = 0
                    continue
                self._lost_or_cancelled()
                return
            except Exception as exc:  # the database blinked: try again next period
                self.failed_renewals += 1
                log.warning("job %s: lease renewal failed (%s)", self.job_id, str(exc).splitlines()[0] if str(exc) else exc)

    def _lost_or_cancelled(self) -> None:
        state = self.store.job_state(self.job_id)
        if state is not None and state[0] == "cancelled":
            self.state = "cancelled"
        elif state is None or state[1] != self.worker or state[0] != "running":
            self.state = "lost"
            self.note_lost()
            log.warning("job %s: lease lost while this worker (%s) was alive; another worker owns it", self.job_id, self.worker)

    def check(self, session: Any = None) -> None:
        """Raise when the job must stop (see the module docstring). With ``session`` the job's row is read in
        that transaction too, so a cancel is seen within one round whatever the renewal period."""
        if self.state == "cancelled":
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if self.state == "lost":
            raise LeaseLost(
                f"job {self.job_id}: lease lost while its worker {self.worker} was alive "
                f"(renewals failed for over {self.lease_s:.0f}s); another worker owns it now"
            )
        if session is not None:
            from sqlalchemy import select

            from marco.store.models import Job

            row = session.execute(select(Job.status, Job.worker).where(Job.id == self.job_id)).one_or_none()
            if row is not None and row.status == "cancelled":
                self.state = "cancelled"
                self.check()
            if row is None or row.worker != self.worker or row.status != "running":
                self.state = "lost"  # counted by note_lost() once this transaction has rolled back
                self.check()

    def note_lost(self) -> None:
        """Count this lease loss in ``jobs.lease_losses`` (once)."""
        if not self._noted:
            self._noted = True
            self.store.note_lease_lost(self.job_id)

    def check_shutdown(self) -> None:
        if SHUTDOWN.is_set():
            raise ShutdownRequested(f"job {self.job_id}: worker {self.worker} is shutting down")

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
