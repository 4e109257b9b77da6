"""The job queue's state machine: claim, lease renewal, end, expiry and batch closing.

A job moves ``queued -> running -> done | failed | cancelled``; every move is one conditional UPDATE, so
two workers (or two schedulers) never both win the same transition.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Iterator, Sequence

from sqlalchemy import String, and_, case, cast, func, literal, or_, select, update
from sqlalchemy.orm import Session

from marco import metrics
from marco.store.base import StoreBase
from marco.store.models import Batch, Job
from marco.store.rows import JobClaim, _aware, _is_uuid


ID_CHUNK = 10_000  # ids per statement: far under the driver's 65,535 bound parameters, whatever the backlog


def _id_chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    ids = [i for i in ids if _is_uuid(i)]
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]


class QueueMixin(StoreBase):
    """Job leases and the queue service the scheduler and workers use."""

    def claim_job(
        self, job_id: str, worker: str, lease_s: float = 300.0, reclaim: bool = False, token: int | None = None
    ) -> JobClaim | None:
        """Take ``job_id`` if it is queued, or running under an expired lease; None when someone else holds
        it or it has ended. One atomic ``UPDATE ... RETURNING``, so two workers never both win. Every claim
        gets a new fencing token (``jobs.lease_token + 1``, see :mod:`marco.store.fence`) and restarts the
        re-send back-off (``resend_step``); taking over an expired lease counts one expiry.

        ``reclaim`` with ``token``: also take it back while this same ``worker`` still holds it under that
        token (a task retried after a database outage kept its lease, since the outage also kept it from
        handing the lease back). Another process's lease under the same worker name is never taken: its
        token differs. A reclaim that finds the job requeued under its own token counts a lease lost by a
        live worker (the scheduler saw an expiry, the worker was alive)."""
        now = self._now()
        expired = and_(Job.status == "running", Job.lease_until < now)
        claimable = or_(Job.status == "queued", expired)
        own = and_(Job.worker == worker, Job.lease_token == token) if reclaim and token is not None else None
        if own is not None:
            claimable = or_(claimable, and_(Job.status == "running", own))
            taken_over = and_(expired, ~own)
            lost_own = case((and_(Job.status == "queued", Job.lease_token == token), 1), else_=0)
        else:
            taken_over, lost_own = expired, literal(0)
        stmt = (
            update(Job)
            .where(Job.id == job_id, claimable)
            .values(
                status="running",
                attempts=Job.attempts + 1,
                lease_token=Job.lease_token + 1,
                expiries=Job.expiries + case((taken_over, 1), else_=0),
                lease_losses=Job.lease_losses + lost_own,
                resend_step=0,
                worker=worker,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=func.coalesce(Job.started_at, now),
                error=None,
            )
            .returning(
                Job.id, Job.batch_id, Job.seq, Job.kind, Job.payload, Job.attempts, Job.worker, Job.lease_until,
                Job.lease_token,
            )
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
            token=int(row.lease_token),
        )

    @staticmethod
    def _held(job_id: str, worker: str, token: int | None) -> list[Any]:
        conds = [Job.id == job_id, Job.worker == worker, Job.status == "running"]
        if token is not None:
            conds.append(Job.lease_token == token)
        return conds

    def renew_lease(
        self, job_id: str, worker: str, lease_s: float = 300.0, session: Session | None = None, token: int | None = None
    ) -> bool:
        """Extend the lease this worker holds (under ``token`` when given); False when it lost it."""
        now = self._now()
        stmt = update(Job).where(*self._held(job_id, worker, token)).values(lease_until=now + timedelta(seconds=lease_s))
        if session is not None:
            renewed = session.execute(stmt).rowcount == 1
        else:
            with self.sessions.begin() as s:
                renewed = s.execute(stmt).rowcount == 1
        if renewed:
            metrics.LEASE_RENEWALS.inc()
        return renewed

    def job_state(self, job_id: str) -> tuple[str, str | None] | None:
        """``(status, worker)`` of a job (None when it does not exist): one primary-key read."""
        with self.sessions() as s:
            row = s.execute(select(Job.status, Job.worker).where(Job.id == job_id)).one_or_none()
        return None if row is None else (row.status, row.worker)

    def job_lease(self, job_id: str) -> tuple[str, str | None, int] | None:
        """``(status, worker, lease_token)`` of a job (None when it does not exist)."""
        with self.sessions() as s:
            row = s.execute(select(Job.status, Job.worker, Job.lease_token).where(Job.id == job_id)).one_or_none()
        return None if row is None else (row.status, row.worker, int(row.lease_token))

    def release_job(self, job_id: str, worker: str, reason: str | None = None, token: int | None = None) -> bool:
        """Hand a running job back to the queue (a worker shutting down, or its model server down, with
        ``reason`` kept in ``jobs.error`` until the next claim); False when it no longer held it. Counted in
        ``jobs.releases``, never as a death. Its searches resume from the nodes already stored wherever it
        runs next."""
        values: dict[str, object] = {
            "status": "queued", "worker": None, "lease_until": None, "enqueued_at": self._now(),
            "releases": Job.releases + 1,
        }
        if reason is not None:
            values["error"] = reason
        with self.sessions.begin() as s:
            return s.execute(update(Job).where(*self._held(job_id, worker, token)).values(**values)).rowcount == 1

    def note_lease_lost(self, job_id: str) -> None:
        """Count a lease lost by a live worker (its renewals failed, e.g. the database was away longer than
        the lease): such an attempt is not a worker death and does not count toward ``max_attempts``."""
        metrics.LEASES_LOST.inc()
        with self.sessions.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(lease_losses=Job.lease_losses + 1))

    def mark_enqueued(self, job_ids: Sequence[str]) -> None:
        """Record that messages for ``job_ids`` were just sent (``jobs.enqueued_at``), in chunks."""
        with self.sessions.begin() as s:
            for ids in _id_chunks(job_ids):
                s.execute(update(Job).where(Job.id.in_(ids), Job.status == "queued").values(enqueued_at=self._now()))

    def queued_counts(self) -> dict[str, int]:
        """``{kind: jobs queued}`` (what the broker should hold a message for)."""
        with self.sessions() as s:
            rows = s.execute(select(Job.kind, func.count()).where(Job.status == "queued").group_by(Job.kind)).all()
        return {str(kind): int(n) for kind, n in rows}

    def queued_among(self, job_ids: Sequence[str]) -> dict[str, list[str]]:
        """``{kind: the ids among job_ids of jobs still queued}`` (ids that are not jobs are left out)."""
        out: dict[str, list[str]] = {}
        with self.sessions() as s:
            for ids in _id_chunks(sorted(set(job_ids))):
                for job_id, kind in s.execute(select(Job.id, Job.kind).where(Job.id.in_(ids), Job.status == "queued")):
                    out.setdefault(str(kind), []).append(str(job_id))
        return out

    def job_priorities(self, job_ids: Sequence[str]) -> dict[str, int]:
        """``{job_id: its batch's priority}`` (a re-sent message keeps its batch's place)."""
        out: dict[str, int] = {}
        with self.sessions() as s:
            for ids in _id_chunks(job_ids):
                rows = s.execute(select(Job.id, Batch.priority).join(Batch, Batch.id == Job.batch_id).where(Job.id.in_(ids)))
                out.update({str(r.id): int(r.priority or 0) for r in rows})
        return out

    def resend_stranded(
        self,
        stale_s: float,
        max_backoff: int = 4,
        limits: dict[str, int] | None = None,
        max_jobs: int = 10_000,
        skip: Sequence[str] = (),
    ) -> list[tuple[str, str]]:
        """Queued jobs whose message was sent ``stale_s`` ago (``stale_s * 2**resend_step``, at most
        ``2**max_backoff`` times that, for a job re-sent since its last claim) and never claimed, oldest
        first: their message was probably lost (Redis restarted without persistence, failed over, flushed).
        Each one's ``enqueued_at`` moves to now and ``resends`` and ``resend_step`` go up by one; returns
        ``[(job_id, kind)]`` for the caller to send again.

        ``limits``: at most this many jobs per kind, the evidence of loss the caller has (queued jobs of a
        kind the broker holds no message for); a kind not in it is not re-sent. None: no evidence is
        available (a broker that cannot count), the age alone decides, at most ``max_jobs`` per call.
        Cut-offs and limits are in SQL (no id list), and rows another scheduler is re-sending are skipped.
        ``skip``: jobs known to have a message in flight (delivered to a worker, not yet claimed; a short list).
        """
        skip_ids = [j for j in skip if _is_uuid(j)]
        now = self._now()
        age = func.coalesce(Job.enqueued_at, Job.created_at)
        kinds: list[tuple[str | None, int]] = [(None, max_jobs)] if limits is None else [
            (k, min(n, max_jobs)) for k, n in sorted(limits.items()) if n > 0
        ]
        out: list[tuple[str, str]] = []
        with self.sessions.begin() as s:
            for kind, budget in kinds:
                for n in range(max_backoff + 1):
                    left = budget - sum(1 for _, k in out if kind is None or k == kind)
                    if left <= 0:
                        break
                    step = Job.resend_step == n if n < max_backoff else Job.resend_step >= n
                    cutoff = now - timedelta(seconds=stale_s * 2**n)
                    conds = [Job.status == "queued", step, age < cutoff]
                    if skip_ids:
                        conds.append(Job.id.notin_(skip_ids))
                    if kind is not None:
                        conds.append(Job.kind == kind)
                    pick = select(Job.id).where(*conds).order_by(age).limit(left)
                    if self.dialect == "postgresql":
                        # Materialized, so the LIMIT holds: as a plain `IN (subquery … FOR UPDATE SKIP LOCKED)`
                        # Postgres may run the subquery again per row and update every stale row.
                        pick = pick.with_for_update(skip_locked=True)
                        picked = select(pick.cte("pick").prefix_with("MATERIALIZED").c.id)
                    else:
                        picked = pick
                    out.extend(
                        (str(r.id), r.kind)
                        for r in s.execute(
                            update(Job)
                            .where(Job.id.in_(picked.scalar_subquery()), *conds)
                            .values(enqueued_at=now, resends=Job.resends + 1, resend_step=Job.resend_step + 1)
                            .returning(Job.id, Job.kind)
                            .execution_options(synchronize_session=False)
                        )
                    )
        return out

    def finish_job(self, job_id: str, worker: str | None = None, token: int | None = None) -> bool:
        """Mark a running job done (only by its lease holder when ``worker`` is given, and only under the
        claim's fencing ``token`` when given: one conditional UPDATE, so a lost lease never ends the job)."""
        return self._end_job(job_id, "done", None, worker, token)

    def fail_job(self, job_id: str, reason: str, worker: str | None = None, token: int | None = None) -> bool:
        """Mark a job failed with ``reason`` (kept in ``jobs.error``); ``worker``/``token`` as in finish_job."""
        return self._end_job(job_id, "failed", reason, worker, token)

    def _end_job(self, job_id: str, status: str, error: str | None, worker: str | None, token: int | None = None) -> bool:
        now = self._now()
        conds = [Job.id == job_id, Job.status.in_(("queued", "running"))]
        if worker is not None:
            conds.append(Job.worker == worker)
        if token is not None:
            conds += [Job.lease_token == token, Job.status == "running"]
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
        if (s.scalar(select(Batch.config).where(Batch.id == batch_id)) or {}).get("submitting"):
            return  # a chunked submission is still writing this batch's jobs (planning.create_batch)
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
        """Put running jobs whose lease expired back to ``queued``, counting one expiry each.

        Returns ``([(job_id, kind), ...] requeued, [job_id, ...] failed)``: a job whose worker died
        ``max_attempts`` times fails instead (a job that kills its worker must not loop forever). Only deaths
        count: an expiry that its live worker later reported as a lost lease (``lease_losses``) is not one,
        nor is a hand-back (``releases``: warm shutdown, model server down). Each job is moved by one
        conditional UPDATE, so two schedulers never requeue the same job twice.
        """
        now = self._now()
        expired = and_(Job.status == "running", Job.lease_until < now)
        failed: list[str] = []
        with self.sessions.begin() as s:
            if max_attempts is not None:
                deaths = Job.expiries + 1 - Job.lease_losses
                rows = s.execute(
                    update(Job)
                    .where(expired, deaths >= max_attempts)
                    .values(
                        status="failed",
                        finished_at=now,
                        lease_until=None,
                        expiries=Job.expiries + 1,
                        error=literal("lease expired ") + cast(deaths, String)
                        + literal(" times with no renewal from its worker (it died each time: out of memory? "
                                  "killed? hung?); not counted: hand-backs by a live worker (shutdown, model "
                                  "server down): ")
                        + cast(Job.releases, String)
                        + literal("; leases lost by a live worker: ")
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
                .values(status="queued", worker=None, lease_until=None, enqueued_at=now, expiries=Job.expiries + 1)
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
        out: dict[str, str] = {}
        with self.sessions() as s:
            for ids in _id_chunks(job_ids):
                out.update({str(r.id): r.kind for r in s.execute(select(Job.id, Job.kind).where(Job.id.in_(ids)))})
        return out

