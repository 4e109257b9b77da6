"""Planning: models, batches with their problems, jobs and searches; cancel, requeue and delete a batch."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Sequence

from sqlalchemy import select, update

from marco.search.base import SearchConfig
from marco.search.tree import make_id
from marco.store.base import StoreBase
from marco.store.models import Batch, Job, Model, NodeRow, ProblemRow, Search
from marco.store.queue import _id_chunks
from marco.store.rows import BatchPlan
from marco.tasks.base import Problem

SUBMITTING = "submitting"  # in batches.config while a chunked submission is still writing jobs


class PlanningMixin(StoreBase):
    """Write what a batch is; change a whole batch's state."""

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
        rows_per_txn: int | None = None,
        on_chunk: Callable[[list[str], int, int], None] | None = None,
    ) -> BatchPlan:
        """Write a batch, its problems, its jobs (``chunk_size`` problems each) and one pending search per
        (problem, config), all in bulk. Every config of the batch runs on every problem of a job.

        ``batch.config`` records ``task``, ``model`` and the search configs, which is everything a worker
        needs to execute a job (problems come from the ``problems`` table).

        ``rows_per_txn`` (a large batch): write the batch in transactions of about that many problems, whole
        jobs each, calling ``on_chunk(job_ids, problems_written, problems_total)`` after each commit (the
        caller enqueues those jobs and shows progress). Workers start on the first chunk while the rest is
        written; no transaction holds locks for the whole submission; and ``batches.config`` carries
        ``"submitting": true`` until the last chunk is in, so the batch is not closed in between (see
        :meth:`QueueMixin._refresh_batch`). Should a chunk fail, the caller deletes the batch.
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
        if rows_per_txn:
            self._write_in_chunks(batch_row, problem_rows, job_rows, search_rows, rows_per_txn, on_chunk)
        else:
            with self.sessions.begin() as s:
                s.execute(self.insert_ignore(Batch.__table__), [batch_row])
                self._bulk_insert(s, ProblemRow.__table__, problem_rows)
                self._bulk_insert(s, Job.__table__, job_rows)
                self._bulk_insert(s, Search.__table__, search_rows)
            if on_chunk is not None:
                on_chunk([r["id"] for r in job_rows], len(problem_rows), len(problem_rows))
        return BatchPlan(
            batch_id=batch_id,
            job_ids=[r["id"] for r in job_rows],
            problem_ids=[r["id"] for r in problem_rows],
            search_ids=[r["id"] for r in search_rows],
        )

    def _write_in_chunks(
        self,
        batch_row: dict[str, Any],
        problem_rows: list[dict[str, Any]],
        job_rows: list[dict[str, Any]],
        search_rows: list[dict[str, Any]],
        rows_per_txn: int,
        on_chunk: Callable[[list[str], int, int], None] | None,
    ) -> None:
        batch_id = batch_row["id"]
        with self.sessions.begin() as s:
            s.execute(self.insert_ignore(Batch.__table__), [{**batch_row, "config": {**batch_row["config"], SUBMITTING: True}}])
        problems_of = {r["id"]: r for r in problem_rows}
        searches_of: dict[str, list[dict[str, Any]]] = {}
        for r in search_rows:
            searches_of.setdefault(r["job_id"], []).append(r)
        written, total, i = 0, len(problem_rows), 0
        while i < len(job_rows):
            jobs, n = [], 0
            while i < len(job_rows) and (not jobs or n < rows_per_txn):
                jobs.append(job_rows[i])
                n += len(job_rows[i]["payload"]["problem_ids"])
                i += 1
            with self.sessions.begin() as s:
                self._bulk_insert(s, ProblemRow.__table__, [problems_of[p] for j in jobs for p in j["payload"]["problem_ids"]])
                self._bulk_insert(s, Job.__table__, jobs)  # claimable at commit, with its problems and searches
                self._bulk_insert(s, Search.__table__, [r for j in jobs for r in searches_of.get(j["id"], [])])
            written += n
            if on_chunk is not None:
                on_chunk([j["id"] for j in jobs], written, total)
        with self.sessions.begin() as s:
            batch = s.scalar(select(Batch).where(Batch.id == batch_id).with_for_update())
            if batch is not None:
                batch.config = {k: v for k, v in (batch.config or {}).items() if k != SUBMITTING}
        with self.sessions.begin() as s:
            self._refresh_batch(s, batch_id)  # every job may have ended while the last chunks were written

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
        """Put the batch's failed jobs back in the queue (their searches resume from stored nodes). An
        archived batch is refused: its jobs would resume from no nodes (restore it first)."""
        with self.sessions.begin() as s:
            self._require_batch(s, batch_id)
            locked = select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
            if self.dialect == "postgresql":
                locked = locked.with_for_update()  # serialised with `marco archive` marking the batch
            batch = s.scalars(locked).one()
            if batch.archived_at is not None:
                from marco.store.archive import BatchArchived

                raise BatchArchived(str(batch.id), batch.archive_path, batch.archived_at)
            ids = [
                str(i)
                for i in s.scalars(
                    update(Job)
                    .where(Job.batch_id == batch_id, Job.status == "failed")
                    .values(status="queued", error=None, finished_at=None, worker=None, lease_until=None, enqueued_at=self._now())
                    .returning(Job.id)
                )
            ]
            for chunk in _id_chunks(ids):  # any number of failed jobs: never one unbounded IN (...) list
                s.execute(
                    update(Search)
                    .where(Search.job_id.in_(chunk), Search.status == "failed", Search.error.is_not(None))
                    .where(Search.problem_id.in_(select(ProblemRow.id).where(ProblemRow.error.is_(None))))
                    .values(status="pending", error=None)
                )
            if ids:
                s.execute(update(Batch).where(Batch.id == batch_id).values(status="running", finished_at=None))
        return ids

