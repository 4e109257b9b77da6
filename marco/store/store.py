"""The :class:`Store` facade: plan batches, run the job queue's state machine, write and read traces.

Everything that touches many rows goes through Core bulk statements (a list of parameter rows per
statement), never ORM objects one by one, so planning 10,000 problems or writing a lockstep round of
hundreds of nodes costs a handful of round trips.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from sqlalchemy import Engine, and_, bindparam, case, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from marco.search.base import SearchConfig, SearchResult
from marco.search.tree import Node, Tree, make_id
from marco.store import migrate
from marco.store.db import StoreError, check_connection, make_engine, make_session_factory
from marco.store.models import Batch, Job, Model, NodeRow, ProblemRow, Search
from marco.store.training import TrainingStoreMixin  # issue 5: cot_examples, training_runs, checkpoints
from marco.tasks.base import Problem

NODE_TABLE = NodeRow.__table__
_INSERT_CHUNK = 5000  # rows per INSERT statement (keeps bound parameters under driver limits)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


@dataclass(frozen=True)
class BatchPlan:
    """What :meth:`Store.create_batch` wrote."""

    batch_id: str
    job_ids: list[str]
    problem_ids: list[str]
    search_ids: list[str]


@dataclass(frozen=True)
class JobClaim:
    """A job this worker now holds the lease of."""

    id: str
    batch_id: str
    seq: int
    kind: str
    payload: dict[str, Any]
    attempts: int
    worker: str
    lease_until: datetime


@dataclass
class BatchProgress:
    """Counts for ``marco status`` and the scheduler."""

    batch_id: str
    status: str
    jobs: dict[str, int] = field(default_factory=dict)
    searches: dict[str, int] = field(default_factory=dict)
    n_problems: int = 0
    solved: int = 0  # searches that produced an answer
    correct: int = 0
    scored: int = 0  # searches with a correct/wrong verdict
    tokens: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def finished(self) -> bool:
        return not (self.jobs.get("queued", 0) or self.jobs.get("running", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "status": self.status,
            "jobs": dict(self.jobs),
            "searches": dict(self.searches),
            "n_problems": self.n_problems,
            "solved": self.solved,
            "correct": self.correct,
            "scored": self.scored,
            "accuracy": self.accuracy,
            "tokens": self.tokens,
        }


def node_to_row(node: Node) -> dict[str, Any]:
    confidences = [float(c) for c in node.confidences]
    return {
        "id": node.id,
        "search_id": node.search_id,
        "parent_id": node.parent_id,
        "seq": node.seq,
        "round": node.round,
        "sibling_index": node.index,
        "depth": node.depth,
        "kind": node.kind,
        "text": node.text,
        "token_ids": [int(t) for t in node.token_ids],
        "confidences": confidences,
        "num_tokens": len(node.token_ids),
        "mean_confidence": sum(confidences) / len(confidences) if confidences else None,
        "value": node.value,
        "value_sum": float(node.value_sum),
        "visits": int(node.visits),
        "terminal": bool(node.terminal),
        "answer": node.answer,
        "finish_reason": node.finish_reason,
    }


def row_to_node(row: Any) -> Node:
    return Node(
        id=str(row.id),
        search_id=str(row.search_id),
        parent_id=None if row.parent_id is None else str(row.parent_id),
        depth=row.depth,
        kind=row.kind,
        text=row.text,
        token_ids=list(row.token_ids or []),
        confidences=list(row.confidences or []),
        value=row.value,
        value_sum=row.value_sum,
        visits=row.visits,
        terminal=row.terminal,
        answer=row.answer,
        round=row.round,
        index=row.sibling_index,
        finish_reason=row.finish_reason,
        seq=row.seq,
    )


def problem_from_row(row: ProblemRow) -> Problem:
    return Problem(
        dataset=row.dataset,
        lang=row.lang,
        index=row.index,
        question=row.question,
        references=tuple(row.reference or ()),
        error=row.error,
        meta=dict(row.meta or {}),
    )


def _chunks(rows: Sequence[dict[str, Any]], size: int = _INSERT_CHUNK) -> Iterable[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


class Store(TrainingStoreMixin):
    """The project's database: one per URL/engine. Thread-safe like its engine; cheap to share.

    ``Store.open(url)`` checks that the database answers and brings its schema to the latest migration.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.sessions = make_session_factory(engine)

    @classmethod
    def open(cls, url: str | None = None, *, upgrade: bool = True, **engine_kwargs: Any) -> "Store":
        """Connect to ``url`` (default ``$MARCO_DATABASE_URL`` or ``sqlite:///marco.db``).

        Raises :class:`StoreError` with a one-line reason when the database does not answer.
        """
        engine = make_engine(url, **engine_kwargs)
        check_connection(engine)
        if upgrade and not migrate.is_current(engine):
            migrate.upgrade(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing helpers
    def insert_ignore(self, table: Any) -> Any:
        """``INSERT ... ON CONFLICT DO NOTHING`` for this database."""
        if self.dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing()
        if self.dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        raise StoreError(f"unsupported database {self.dialect!r}: use PostgreSQL or SQLite")

    def _bulk_insert(self, session: Session, table: Any, rows: Sequence[dict[str, Any]]) -> None:
        stmt = self.insert_ignore(table)
        for chunk in _chunks(rows):
            session.execute(stmt, list(chunk))

    def _now(self) -> Any:
        """The database's clock on Postgres (workers' clocks may drift); UTC now on SQLite."""
        return func.now() if self.dialect == "postgresql" else utcnow()

    # ------------------------------------------------------------------ models
    def ensure_model(
        self,
        spec: str,
        *,
        name: str | None = None,
        kind: str = "base",
        parent_id: str | None = None,
        path: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> str:
        """The id of the model with ``spec`` (created on first use)."""
        if spec.startswith("checkpoint:"):  # a trained checkpoint is registered with its lineage (issue 5)
            return str(self.get_checkpoint(spec).id)
        model_id = make_id("model", spec)
        row = {
            "id": model_id,
            "name": name or spec,
            "spec": spec,
            "kind": kind,
            "parent_id": parent_id,
            "path": path,
            "meta": meta or {},
        }
        with self.sessions.begin() as s:
            s.execute(self.insert_ignore(Model.__table__), [row])
        return model_id

    # ------------------------------------------------------------------ planning
    def create_batch(
        self,
        problems: Sequence[Problem],
        configs: Sequence[SearchConfig],
        *,
        kind: str = "reason",
        name: str | None = None,
        dataset: str | None = None,
        model: str | None = None,
        task: str | None = None,
        chunk_size: int = 8,
        priority: int = 0,
        extra: dict[str, Any] | None = None,
        batch_id: str | None = None,
    ) -> BatchPlan:
        """Write a batch, its problems, its jobs (``chunk_size`` problems each) and one pending search per
        (problem, config), all in bulk. Every config of the batch runs on every problem of a job.

        ``batch.config`` records ``task``, ``model`` and the search configs, which is everything a worker
        needs to execute a job (problems come from the ``problems`` table).
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be a positive number of problems")
        if not configs and kind == "reason":
            raise ValueError("a reason batch needs at least one search config")
        labels = [c.label for c in configs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"search configs of one batch need distinct labels, got {labels}")
        batch_id = batch_id or str(uuid.uuid4())
        dataset = dataset or (problems[0].dataset if problems else None)
        model_id = self.ensure_model(model) if model else None
        config = {
            "task": task or dataset,
            "model": model,
            "chunk_size": chunk_size,
            "searches": [c.to_dict() for c in configs],
            **(extra or {}),
        }

        problem_rows: list[dict[str, Any]] = []
        job_rows: list[dict[str, Any]] = []
        search_rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for p in problems:
            if p.key in seen:
                raise ValueError(f"problem {p.key} appears twice in the batch")
            seen.add(p.key)
        for seq, start in enumerate(range(0, len(problems), chunk_size)):
            job_id = make_id("job", batch_id, seq)
            chunk = problems[start : start + chunk_size]
            ids = [make_id("problem", batch_id, p.key) for p in chunk]
            job_rows.append(
                {"id": job_id, "batch_id": batch_id, "seq": seq, "kind": kind, "payload": {"problem_ids": ids}}
            )
            for pid, p in zip(ids, chunk):
                problem_rows.append(
                    {
                        "id": pid,
                        "batch_id": batch_id,
                        "dataset": p.dataset,
                        "lang": p.lang,
                        "index": p.index,
                        "question": p.question,
                        "reference": list(p.references),
                        "error": p.error,
                        "meta": dict(p.meta),
                    }
                )
                for c in configs:
                    search_rows.append(
                        {
                            "id": make_id("search", job_id, p.key, c.label),
                            "batch_id": batch_id,
                            "job_id": job_id,
                            "problem_id": pid,
                            "model_id": model_id,
                            "dataset": p.dataset,
                            "lang": p.lang,
                            "strategy": c.strategy,
                            "action": c.action,
                            "label": c.label,
                            "config": c.to_dict(),
                        }
                    )
        batch_row = {
            "id": batch_id,
            "name": name or f"{dataset or kind}-{batch_id[:8]}",
            "kind": kind,
            "dataset": dataset,
            "model_id": model_id,
            "config": config,
            "priority": priority,
            "n_problems": len(problem_rows),
            "n_jobs": len(job_rows),
            "n_searches": len(search_rows),
        }
        with self.sessions.begin() as s:
            s.execute(self.insert_ignore(Batch.__table__), [batch_row])
            self._bulk_insert(s, ProblemRow.__table__, problem_rows)
            self._bulk_insert(s, Job.__table__, job_rows)
            self._bulk_insert(s, Search.__table__, search_rows)
        return BatchPlan(
            batch_id=batch_id,
            job_ids=[r["id"] for r in job_rows],
            problem_ids=[r["id"] for r in problem_rows],
            search_ids=[r["id"] for r in search_rows],
        )

    # ------------------------------------------------------------------ job leases
    def claim_job(self, job_id: str, worker: str, lease_s: float = 300.0) -> JobClaim | None:
        """Take ``job_id`` if it is queued, or running under an expired lease; None when someone else holds
        it or it has ended. One atomic ``UPDATE ... RETURNING``, so two workers never both win."""
        now = self._now()
        stmt = (
            update(Job)
            .where(
                Job.id == job_id,
                or_(Job.status == "queued", and_(Job.status == "running", Job.lease_until < now)),
            )
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

    def finish_job(self, job_id: str, worker: str | None = None) -> bool:
        """Mark a running job done (only by its lease holder when ``worker`` is given)."""
        return self._end_job(job_id, "done", None, worker)

    def fail_job(self, job_id: str, reason: str, worker: str | None = None) -> bool:
        """Mark a job failed with ``reason`` (kept in ``jobs.error``)."""
        return self._end_job(job_id, "failed", reason, worker)

    def release_job(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue (its model server is down): ``queued`` again with ``reason``
        kept in ``jobs.error`` until the next claim, so the retry resumes it from its stored nodes."""
        with self.sessions.begin() as s:
            return s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                .values(status="queued", worker=None, lease_until=None, error=reason)
            ).rowcount == 1

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

    # --- queue service (issue 4): what the scheduler and `marco submit` need -------------------------
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
                rows = s.execute(
                    update(Job)
                    .where(expired, Job.attempts >= max_attempts)
                    .values(
                        status="failed",
                        finished_at=now,
                        lease_until=None,
                        error=f"lease expired {max_attempts} times (its worker died each time: out of memory? killed?)",
                    )
                    .returning(Job.id, Job.batch_id)
                ).all()
                failed = [str(r.id) for r in rows]
                for batch_id in {str(r.batch_id) for r in rows}:
                    self._refresh_batch(s, batch_id)
            requeued = s.execute(
                update(Job).where(expired).values(status="queued", worker=None, lease_until=None).returning(Job.id, Job.kind)
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

    def delete_batch(self, batch_id: str) -> None:
        """Remove a batch with its jobs, problems, searches and nodes (a submit whose enqueue failed)."""
        from sqlalchemy import delete

        with self.sessions.begin() as s:
            searches = select(Search.id).where(Search.batch_id == batch_id)
            s.execute(delete(NodeRow).where(NodeRow.search_id.in_(searches)))
            s.execute(delete(Search).where(Search.batch_id == batch_id))
            s.execute(delete(Job).where(Job.batch_id == batch_id))
            s.execute(delete(ProblemRow).where(ProblemRow.batch_id == batch_id))
            s.execute(delete(Batch).where(Batch.id == batch_id))

    def job_kinds(self, job_ids: Sequence[str]) -> dict[str, str]:
        """``{job_id: kind}`` for the jobs that exist."""
        with self.sessions() as s:
            rows = s.execute(select(Job.id, Job.kind).where(Job.id.in_([i for i in job_ids if _is_uuid(i)]))).all()
        return {str(r.id): r.kind for r in rows}

    # --- end queue service ---------------------------------------------------------------------------

    def cancel_batch(self, batch_id: str) -> int:
        """Cancel the batch's queued and running jobs (and pending searches); returns the jobs cancelled."""
        now = self._now()
        with self.sessions.begin() as s:
            self._require_batch(s, batch_id)
            n = s.execute(
                update(Job)
                .where(Job.batch_id == batch_id, Job.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=now, lease_until=None)
            ).rowcount
            s.execute(
                update(Search)
                .where(Search.batch_id == batch_id, Search.status.in_(("pending", "running")))
                .values(status="cancelled")
            )
            s.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=now)
            )
        return n

    def requeue_failed(self, batch_id: str) -> list[str]:
        """Put the batch's failed jobs back in the queue (their searches resume from stored nodes)."""
        with self.sessions.begin() as s:
            self._require_batch(s, batch_id)
            ids = [
                str(i)
                for i in s.scalars(
                    update(Job)
                    .where(Job.batch_id == batch_id, Job.status == "failed")
                    .values(status="queued", error=None, finished_at=None, worker=None, lease_until=None)
                    .returning(Job.id)
                )
            ]
            if ids:
                s.execute(
                    update(Search)
                    .where(Search.job_id.in_(ids), Search.status == "failed", Search.error.is_not(None))
                    .where(Search.problem_id.in_(select(ProblemRow.id).where(ProblemRow.error.is_(None))))
                    .values(status="pending", error=None)
                )
                s.execute(update(Batch).where(Batch.id == batch_id).values(status="running", finished_at=None))
        return ids

    def batch_progress(self, batch_id: str) -> BatchProgress:
        """Jobs and searches by status, answers, correct answers, accuracy and tokens of a batch."""
        with self.sessions() as s:
            batch = self._require_batch(s, batch_id)
            jobs = dict(s.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all())
            searches = dict(
                s.execute(select(Search.status, func.count()).where(Search.batch_id == batch_id).group_by(Search.status)).all()
            )
            agg = s.execute(
                select(
                    func.count(Search.final_answer),
                    func.sum(case((Search.correct.is_(True), 1), else_=0)),
                    func.count(Search.correct),
                    func.coalesce(func.sum(Search.tokens), 0),
                ).where(Search.batch_id == batch_id)
            ).one()
        return BatchProgress(
            batch_id=batch_id,
            status=batch.status,
            jobs={k: int(v) for k, v in jobs.items()},
            searches={k: int(v) for k, v in searches.items()},
            n_problems=batch.n_problems,
            solved=int(agg[0] or 0),
            correct=int(agg[1] or 0),
            scored=int(agg[2] or 0),
            tokens=int(agg[3] or 0),
        )

    # ------------------------------------------------------------------ reading what a job needs
    def _require_batch(self, s: Session, batch_id: str) -> Batch:
        batch = s.get(Batch, batch_id) if _is_uuid(batch_id) else None
        if batch is None:
            raise StoreError(f"no batch {batch_id!r}: list batches with `marco status` or `marco traces list`")
        return batch

    def get_batch(self, batch_id: str) -> Batch:
        with self.sessions() as s:
            return self._require_batch(s, batch_id)

    def get_job(self, job_id: str) -> Job:
        with self.sessions() as s:
            job = s.get(Job, job_id) if _is_uuid(job_id) else None
            if job is None:
                raise StoreError(f"no job {job_id!r}")
            return job

    def batches(self, limit: int = 50) -> list[Batch]:
        with self.sessions() as s:
            return list(s.scalars(select(Batch).order_by(Batch.created_at.desc()).limit(limit)))

    def job_problems(self, job_id: str) -> list[tuple[str, Problem]]:
        """``(problem_id, Problem)`` of a job, in payload order."""
        job = self.get_job(job_id)
        ids = list(job.payload.get("problem_ids", []))
        with self.sessions() as s:
            rows = {str(r.id): r for r in s.scalars(select(ProblemRow).where(ProblemRow.id.in_(ids)))}
        return [(pid, problem_from_row(rows[pid])) for pid in ids if pid in rows]

    def job_searches(self, job_id: str) -> list[Search]:
        with self.sessions() as s:
            return list(s.scalars(select(Search).where(Search.job_id == job_id)))

    def get_search(self, search_id: str) -> Search:
        with self.sessions() as s:
            row = s.get(Search, search_id) if _is_uuid(search_id) else None
            if row is None:
                raise StoreError(f"no search {search_id!r}: find ids with `marco traces list`")
            return row

    def resolve_batch(self, ref: str) -> str:
        """A batch id from an id or a batch name (the newest batch of that name)."""
        with self.sessions() as s:
            if _is_uuid(ref) and s.get(Batch, ref) is not None:
                return ref
            found = s.scalars(select(Batch.id).where(Batch.name == ref).order_by(Batch.created_at.desc())).first()
        if found is None:
            raise StoreError(f"no batch {ref!r}: list batches with `marco traces list` or `marco status`")
        return str(found)

    def find_searches(
        self,
        batch: str | None = None,
        dataset: str | None = None,
        lang: str | None = None,
        strategy: str | None = None,
        correct: bool | None = None,
        limit: int | None = 50,
    ) -> list[Search]:
        """Searches matching every given filter (``strategy`` matches the strategy or the full label),
        newest first."""
        stmt = select(Search)
        if batch is not None:
            stmt = stmt.where(Search.batch_id == self.resolve_batch(batch))
        if dataset is not None:
            stmt = stmt.where(Search.dataset == dataset)
        if lang is not None:
            stmt = stmt.where(Search.lang == lang)
        if strategy is not None:
            stmt = stmt.where(or_(Search.strategy == strategy, Search.label == strategy))
        if correct is not None:
            stmt = stmt.where(Search.correct.is_(correct))
        stmt = stmt.order_by(Search.created_at.desc(), Search.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.sessions() as s:
            return list(s.scalars(stmt))

    def batch_rows(self, batch_id: str) -> list[tuple[Search, ProblemRow]]:
        """Every search of a batch with its problem (what reports aggregate)."""
        with self.sessions() as s:
            self._require_batch(s, batch_id)
            rows = s.execute(
                select(Search, ProblemRow).join(ProblemRow, Search.problem_id == ProblemRow.id).where(Search.batch_id == batch_id)
            ).all()
        return [(r[0], r[1]) for r in rows]

    def get_problem(self, problem_id: str) -> ProblemRow:
        with self.sessions() as s:
            row = s.get(ProblemRow, problem_id)
            if row is None:
                raise StoreError(f"no problem {problem_id!r}")
            return row

    def mark_searches(self, search_ids: Sequence[str], status: str, error: str | None = None) -> None:
        if not search_ids:
            return
        values: dict[str, Any] = {"status": status}
        if error is not None:
            values["error"] = error
        if status in ("done", "failed", "cancelled"):
            values["finished_at"] = self._now()
        with self.sessions.begin() as s:
            s.execute(update(Search).where(Search.id.in_(list(search_ids))).values(**values))

    # ------------------------------------------------------------------ nodes
    def write_nodes(self, new_nodes: Sequence[Node], updated_nodes: Sequence[Node] = (), session: Session | None = None) -> None:
        """One bulk ``INSERT ... ON CONFLICT DO NOTHING`` for ``new_nodes`` and one bulk update of
        ``visits``/``value_sum`` for ``updated_nodes`` (the only columns that change after a write)."""
        if session is None:
            with self.sessions.begin() as s:
                self.write_nodes(new_nodes, updated_nodes, session=s)
            return
        if new_nodes:
            self._bulk_insert(session, NODE_TABLE, [node_to_row(n) for n in new_nodes])
        if updated_nodes:
            self._bulk_update_stats(session, updated_nodes)

    def _bulk_update_stats(self, s: Session, nodes: Sequence[Node]) -> None:
        latest = {n.id: n for n in nodes}  # a node updated twice in one round keeps its last statistics
        if self.dialect == "postgresql":
            # One statement for the whole round: join the table against unnest()ed parameter arrays.
            s.execute(
                text(
                    "UPDATE nodes AS n SET visits = v.visits, value_sum = v.value_sum "
                    "FROM unnest(CAST(:ids AS uuid[]), CAST(:visits AS integer[]), CAST(:sums AS double precision[])) "
                    "AS v(id, visits, value_sum) WHERE n.id = v.id"
                ),
                {
                    "ids": list(latest),
                    "visits": [int(n.visits) for n in latest.values()],
                    "sums": [float(n.value_sum) for n in latest.values()],
                },
            )
            return
        s.execute(
            update(NODE_TABLE)
            .where(NODE_TABLE.c.id == bindparam("node_id"))
            .values(visits=bindparam("new_visits"), value_sum=bindparam("new_value_sum")),
            [{"node_id": n.id, "new_visits": int(n.visits), "new_value_sum": float(n.value_sum)} for n in latest.values()],
        )

    def load_nodes(self, search_id: str) -> list[Node]:
        """Every stored node of a search in creation order (what ``driver.run(resume=...)`` takes)."""
        with self.sessions() as s:
            rows = s.execute(
                select(NODE_TABLE).where(NODE_TABLE.c.search_id == search_id).order_by(NODE_TABLE.c.seq)
            ).all()
        return [row_to_node(r) for r in rows]

    def load_nodes_many(self, search_ids: Sequence[str]) -> dict[str, list[Node]]:
        """Stored nodes of several searches in one query; searches without nodes are left out."""
        out: dict[str, list[Node]] = {}
        if not search_ids:
            return out
        with self.sessions() as s:
            rows = s.execute(
                select(NODE_TABLE)
                .where(NODE_TABLE.c.search_id.in_(list(search_ids)))
                .order_by(NODE_TABLE.c.search_id, NODE_TABLE.c.seq)
            ).all()
        for r in rows:
            out.setdefault(str(r.search_id), []).append(row_to_node(r))
        return out

    def load_tree(self, search_id: str) -> Tree:
        """A stored search as a :class:`Tree` (children linked)."""
        tree = Tree(search_id=search_id)
        for node in self.load_nodes(search_id):
            seq = node.seq
            tree.add(node)
            node.seq = seq
        return tree

    def count_nodes(self, search_id: str | None = None) -> int:
        stmt = select(func.count()).select_from(NODE_TABLE)
        if search_id is not None:
            stmt = stmt.where(NODE_TABLE.c.search_id == search_id)
        with self.sessions() as s:
            return int(s.execute(stmt).scalar_one())

    def path_nodes(self, node_id: str) -> list[Node]:
        """Nodes from the root to ``node_id`` (a recursive CTE), root first."""
        if not _is_uuid(node_id):
            raise StoreError(f"no node {node_id!r}: node ids are UUIDs, see `marco traces show SEARCH`")
        n = NODE_TABLE
        base = select(n.c.id, n.c.parent_id, n.c.depth).where(n.c.id == node_id).cte("path", recursive=True)
        step = select(n.c.id, n.c.parent_id, n.c.depth).join(base, n.c.id == base.c.parent_id)
        cte = base.union_all(step)
        with self.sessions() as s:
            rows = s.execute(select(n).join(cte, n.c.id == cte.c.id).order_by(n.c.depth)).all()
        if not rows:
            raise StoreError(f"no node {node_id!r}: find node ids with `marco traces show SEARCH`")
        return [row_to_node(r) for r in rows]

    # ------------------------------------------------------------------ results
    def write_results(self, results: Sequence[SearchResult]) -> None:
        """Final answers, scores and costs of finished searches (one bulk UPDATE)."""
        if not results:
            return
        now = utcnow()
        rows = []
        for r in results:
            rows.append(
                {
                    "sid": r.search_id,
                    "status": "failed" if r.error else "done",
                    "final_answer": r.answer,
                    "final_node_id": r.final_node_id,
                    "correct": r.correct,
                    "score": None if r.score is None else float(r.score.value),
                    "confidence": r.confidence,
                    "tokens": int(r.tokens),
                    "rounds": int(r.rounds),
                    "elapsed_s": float(r.elapsed_s),
                    "chosen_path": list(r.chosen_path),
                    "error": r.error,
                    "finished_at": now,
                }
            )
        t = Search.__table__
        # bind names must differ from column names in an executemany UPDATE
        stmt = update(t).where(t.c.id == bindparam("sid")).values({k: bindparam("b_" + k) for k in rows[0] if k != "sid"})
        params = [{("b_" + k if k != "sid" else k): v for k, v in row.items()} for row in rows]
        with self.sessions.begin() as s:
            s.execute(stmt, params)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True
