"""Reads: batches, jobs, problems, searches, progress counts and stored trees (traces, reports, resume)."""

from __future__ import annotations

from typing import Sequence

from sqlalchemy import case, func, or_, select

from marco.search.tree import Node, Tree
from marco.store.archive import archived_hint, raise_if_archived
from marco.store.base import StoreBase
from marco.store.db import StoreError
from marco.store.models import Batch, Job, NodeRow, ProblemRow, Search
from marco.store.rows import BatchProgress, _is_uuid, problem_from_row, row_to_node
from marco.tasks.base import Problem

NODE_TABLE = NodeRow.__table__


class ReadsMixin(StoreBase):
    """Everything the CLI, reports and a resuming job read."""

    def batch_progress(self, batch_id: str) -> BatchProgress:
        """Jobs and searches by status, answers, correct answers, accuracy and tokens of a batch."""
        with self.sessions() as s:
            batch = self._require_batch(s, batch_id)
            jobs = dict(s.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all())
            searches = dict(
                s.execute(select(Search.status, func.count()).where(Search.batch_id == batch_id).group_by(Search.status)).all()
            )
            resent, losses = s.execute(
                select(func.coalesce(func.sum(Job.resends), 0), func.coalesce(func.sum(Job.lease_losses), 0)).where(
                    Job.batch_id == batch_id
                )
            ).one()
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
            resent=int(resent or 0),
            lease_losses=int(losses or 0),
        )

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

    def load_nodes(self, search_id: str) -> list[Node]:
        """Every stored node of a search in creation order (what ``driver.run(resume=...)`` takes).

        Raises :class:`~marco.store.archive.BatchArchived` when the search's batch was archived."""
        with self.sessions() as s:
            raise_if_archived(s, [search_id])
            rows = s.execute(
                select(NODE_TABLE).where(NODE_TABLE.c.search_id == search_id).order_by(NODE_TABLE.c.seq)
            ).all()
        return [row_to_node(r) for r in rows]

    def load_nodes_many(self, search_ids: Sequence[str]) -> dict[str, list[Node]]:
        """Stored nodes of several searches in one query; searches without nodes are left out.

        Raises :class:`~marco.store.archive.BatchArchived` when any of the searches' batches was archived
        (never a silently empty tree)."""
        out: dict[str, list[Node]] = {}
        if not search_ids:
            return out
        with self.sessions() as s:
            raise_if_archived(s, search_ids)
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
            if rows:
                raise_if_archived(s, [str(rows[0].search_id)])  # read while its batch was being archived
            hint = "" if rows else archived_hint(s)
        if not rows:
            raise StoreError(f"no node {node_id!r}: find node ids with `marco traces show SEARCH`{hint}")
        return [row_to_node(r) for r in rows]

