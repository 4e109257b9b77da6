"""The job queue's state machine: claim, lease renewal, end, expiry and batch closing.

A job moves ``queued -> running -> done | failed | cancelled``; every move is one conditional UPDATE, so
two workers (or two schedulers) never both win the same transition.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

from sqlalchemy import String, and_, cast, func, literal, or_, select, update
from sqlalchemy.orm import Session

from marco.store.base import StoreBase
from marco.store.models import Batch, Job
from marco.store.rows import JobClaim, _aware, _is_uuid


class QueueMixin(StoreBase):
    """Job leases and the queue service the scheduler and workers use."""

    def claim_job(self, job_id: str, worker: str, lease_s: float = 300.0, reclaim: bool = False) -> JobClaim | None:
        """Take ``job_id`` if it is queued, or running under an expired lease; None when someone else holds
        it or it has ended. One atomic ``UPDATE ... RETURNING``, so two workers never both win.

        ``reclaim``: also take it back while this same ``worker`` still holds it (a task retried after a
        database outage kept its lease, since the outage also kept it from handing the lease back)."""
        now = self._now()
        claimable = or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now))
        if reclaim:
            claimable = or_(claimable, and_(Job.status == "running", Job.worker == worker))
        stmt = (
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                status="running",
                attempts=Job.attempts + 1,
                worker=worker,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=func.coalesce(Job.started_at, now),
                error=None,
            )
            .returning(Job.id, Job.batch_id, Job.seq, Job.kind, Job.payload, Job.attempts, Job.worker, Job.lease_until)
        )
        with self.sessions.begin() as s:
            row = s.execute(stmt).one_or_none()
            if row is None:
                return None
            s.execute(
                update(Batch)
                .where(Batch.id == row.batch_id, Batch.status == "queued")
                .values(status="running", started_at=now)
            )
        return JobClaim(
            id=str(row.id),
            batch_id=str(row.batch_id),
            seq=row.seq,
            kind=row.kind,
            payload=dict(row.payload or {}),
            attempts=row.attempts,
            worker=row.worker,
            lease_until=_aware(row.lease_until),  # type: ignore[arg-type]
        )

    def renew_lease(self, job_id: str, worker: str, lease_s: float = 300.0, session: Session | None = None) -> bool:
        """Extend the lease this worker holds; False when it lost it (expired and claimed by another)."""
        now = self._now()
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(lease_until=now + timedelta(seconds=lease_s))
        )
        if session is not None:
            return session.execute(stmt).rowcount == 1
        with self.sessions.begin() as s:
            return s.execute(stmt).rowcount == 1

    def job_state(self, job_id: str) -> tuple[str, str | None] | None:
        """``(status, worker)`` of a job (None when it does not exist): one primary-key read."""
        with self.sessions() as s:
            row = s.execute(select(Job.status, Job.worker).where(Job.id == job_id)).one_or_none()
        return None if row is None else (row.status, row.worker)

    def release_job(self, job_id: str, worker: str) -> bool:
        """Hand a running job back to the queue (a worker shutting down); False when it no longer held it.
        Its searches resume from the nodes already stored wherever it runs next."""
        with self.sessions.begin() as s:
            return (
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                    .values(status="queued", worker=None, lease_until=None, enqueued_at=self._now())
                ).rowcount
                == 1
            )

    def note_lease_lost(self, job_id: str) -> None:
        """Count a lease lost by a live worker (its renewals failed, e.g. the database was away longer than
        the lease): such an attempt is not a worker death and does not count toward ``max_attempts``."""
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_losses=Job.lease_losses + 1))

    def mark_enqueued(self, job_ids: Sequence[str]) -> None:
        """Record that messages for ``job_ids`` were just sent (``jobs.enqueued_at``)."""
        ids = [i for i in job_ids if _is_uuid(i)]
        if ids:
            with self.sessions.begin() as s:
                s.execute(update(Job).where(Job.id.in_(ids), Job.status == "queued").values(enqueued_at=self._now()))

    def resend_stranded(self, stale_s: float, max_backoff: int = 4) -> list[tuple[str, str]]:
        """Queued jobs whose message was sent ``stale_s`` ago (``stale_s * 2**resends``, at most
        ``2**max_backoff`` times that, for a job already re-sent) and never claimed: their message was
        probably lost (Redis restarted without persistence, failed over, flushed). Each one's
        ``enqueued_at`` moves to now and ``resends`` goes up by one, in one conditional UPDATE per job, so two
        schedulers never both re-send it; returns ``[(job_id, kind)]`` for the caller to send again.

        A message that was not lost but waits behind a long queue gets a duplicate at most once per back-off
        step; a duplicate is harmless (the claim is atomic: the second delivery finds the job held or ended).
        """
        now = self._now()
        with self.sessions() as s:
            rows = s.execute(
                select(Job.id, Job.resends).where(
                    Job.status == "queued",
                    func.coalesce(Job.enqueued_at, Job.created_at) < now - timedelta(seconds=stale_s),
                )
            ).all()
        by_resends: dict[int, list[str]] = {}
        for r in rows:
            by_resends.setdefault(int(r.resends or 0), []).append(str(r.id))
        out: list[tuple[str, str]] = []
        with self.sessions.begin() as s:
            for n, ids in sorted(by_resends.items()):
                cutoff = now - timedelta(seconds=stale_s * 2 ** min(n, max_backoff))
                out.extend(
                    (str(r.id), r.kind)
                    for r in s.execute(
                        update(Job)
                        .where(
                            Job.id.in_(ids),
                            Job.status == "queued",
                            Job.resends == n,
                            func.coalesce(Job.enqueued_at, Job.created_at) < cutoff,
                        )
                        .values(enqueued_at=now, resends=Job.resends + 1)
                        .returning(Job.id, Job.kind)
                    )
                )
        return out

    def finish_job(self, job_id: str, worker: str | None = None) -> bool:
        """Mark a running job done (only by its lease holder when ``worker`` is given)."""
        return self._end_job(job_id, "done", None, worker)

    def fail_job(self, job_id: str, reason: str, worker: str | None = None) -> bool:
        """Mark a job failed with ``reason`` (kept in ``jobs.error``)."""
        return self._end_job(job_id, "failed", reason, worker)

    def _end_job(self, job_id: str, status: str, error: str | None, worker: str | None) -> bool:
        now = self._now()
        conds = [Job.id == job_id, Job.status.in_(("queued", "running"))]
        if worker is not None:
            conds.append(Job.worker == worker)
        with self.sessions.begin() as s:
            row = s.execute(
                update(Job)
                .where(*conds)
                .values(status=status, error=error, finished_at=now, lease_until=None)
                .returning(Job.batch_id)
            ).one_or_none()
            if row is None:
                return False
        # Count in a transaction of its own, after this job's end is committed: when two workers end the
        # last two jobs at once, each transaction alone would still see the other job running, and the
        # batch would stay open; the later of two separate counts sees both ends.
        with self.sessions.begin() as s:
            self._refresh_batch(s, str(row.batch_id))
        return True

    def _refresh_batch(self, s: Session, batch_id: str) -> None:
        """Close the batch when its last job ended (done, or failed if any job failed)."""
        counts = dict(
            s.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
        )
        if counts.get("queued") or counts.get("running"):
            return
        status = "failed" if counts.get("failed") else ("cancelled" if counts.get("cancelled") and not counts.get("done") else "done")
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(("queued", "running")))
            .values(status=status, finished_at=self._now())
        )

    def expired_jobs(self, batch_id: str | None = None) -> list[Job]:
        """Running jobs whose lease has run out (their worker died): the scheduler re-enqueues them."""
        stmt = select(Job).where(Job.status == "running", Job.lease_until < self._now())
        if batch_id is not None:
            stmt = stmt.where(Job.batch_id == batch_id)
        with self.sessions() as s:
            return list(s.scalars(stmt.order_by(Job.lease_until)))

    def queued_jobs(self, batch_id: str) -> list[Job]:
        with self.sessions() as s:
            return list(s.scalars(select(Job).where(Job.batch_id == batch_id, Job.status == "queued").order_by(Job.seq)))

    def requeue_expired(self, max_attempts: int | None = None) -> tuple[list[tuple[str, str]], list[str]]:
        """Put running jobs whose lease expired (their worker died) back to ``queued``.

        Returns ``([(job_id, kind), ...] requeued, [job_id, ...] failed)``: a job that already used
        ``max_attempts`` attempts fails instead (a job that kills its worker must not loop forever). Each
        job is moved by one conditional UPDATE, so two schedulers never requeue the same job twice.
        """
        now = self._now()
        expired = and_(Job.status == "running", Job.lease_until < now)
        failed: list[str] = []
        with self.sessions.begin() as s:
            if max_attempts is not None:
                # Only deaths count: an attempt whose live worker lost its lease (``lease_losses``) does not.
                deaths = Job.attempts - Job.lease_losses
                rows = s.execute(
                    update(Job)
                    .where(expired, deaths >= max_attempts)
                    .values(
                        status="failed",
                        finished_at=now,
                        lease_until=None,
                        error=literal(f"lease expired {max_attempts} times with no renewal from its worker (it died "
                                      "each time: out of memory? killed?); leases lost by a live worker: ")
                        + cast(Job.lease_losses, String),
                    )
                    .returning(Job.id, Job.batch_id)
                ).all()
                failed = [str(r.id) for r in rows]
                for batch_id in {str(r.batch_id) for r in rows}:
                    self._refresh_batch(s, batch_id)
            requeued = s.execute(
                update(Job)
                .where(expired)
                .values(status="queued", worker=None, lease_until=None, enqueued_at=now)
                .returning(Job.id, Job.kind)
            ).all()
        return [(str(r.id), r.kind) for r in requeued], failed

    def refresh_batches(self) -> list[str]:
        """Close every open batch none of whose jobs is queued or running (counted in the store);
        returns the ids of the batches this call closed."""
        with self.sessions.begin() as s:
            open_ids = [str(i) for i in s.scalars(select(Batch.id).where(Batch.status.in_(("queued", "running"))))]
            closed = []
            for batch_id in open_ids:
                self._refresh_batch(s, batch_id)
                if s.scalar(select(Batch.status).where(Batch.id == batch_id)) not in ("queued", "running"):
                    closed.append(batch_id)
        return closed

    def job_kinds(self, job_ids: Sequence[str]) -> dict[str, str]:
        """``{job_id: kind}`` for the jobs that exist."""
        with self.sessions() as s:
            rows = s.execute(select(Job.id, Job.kind).where(Job.id.in_([i for i in job_ids if _is_uuid(i)]))).all()
        return {str(r.id): r.kind for r in rows}

