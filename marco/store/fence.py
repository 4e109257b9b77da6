"""Fencing: a claim's lease token, and the check every write of a job's results makes with it.

Each claim of a job bumps ``jobs.lease_token`` (a generation that only grows). A worker writes its job's
results (nodes, searches, synthesis rows, checkpoints, the job's end) only in a transaction that first
reads the job's row ``FOR SHARE`` and finds its own token there with the job still ``running``; a
requeue or a new claim (an UPDATE of that row) waits for such a transaction to commit, and once it has
committed the old token is gone. So a worker that lost its lease can never commit anything for the job,
whatever its clock, its heartbeat or the database outage it went through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session


class JobStopped(Exception):
    """A job stopped before its end for a reason that is not its own failure."""


class LeaseLost(JobStopped, RuntimeError):
    """Another worker took over this job (our lease expired, or our token is no longer the job's); stop
    writing."""


class JobCancelled(JobStopped):
    """The job's batch was cancelled."""


@dataclass(frozen=True)
class Fence:
    """The lease one claim holds: ``job_id`` under ``worker`` with ``token`` (``jobs.lease_token``)."""

    job_id: str
    worker: str
    token: int

    def check(self, session: Session) -> None:
        """Raise :class:`LeaseLost` (or :class:`JobCancelled`) unless this claim still holds the job; holds
        a share lock on the job's row until ``session`` ends, so no requeue or claim commits in between."""
        from marco.store.models import Job

        stmt = select(Job.status, Job.worker, Job.lease_token).where(Job.id == self.job_id)
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(read=True)
        row = session.execute(stmt).one_or_none()
        if row is not None and row.status == "cancelled" and row.lease_token == self.token:
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if row is None or row.status != "running" or row.lease_token != self.token or row.worker != self.worker:
            raise LeaseLost(
                f"job {self.job_id}: claim {self.token} by {self.worker} no longer holds the job "
                f"(now {'gone' if row is None else f'{row.status}, claim {row.lease_token}'}); nothing written"
            )


def check_fence(session: Session, fence: Any) -> None:
    """``fence.check(session)`` when a fence is given (writes outside a job pass None)."""
    if fence is not None:
        fence.check(session)
