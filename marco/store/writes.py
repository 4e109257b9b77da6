"""Writes a running job makes: search status, tree nodes (bulk insert + stats update), final results."""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import bindparam, text, update
from sqlalchemy.orm import Session

from marco.search.base import SearchResult
from marco.search.tree import Node
from marco.store.base import StoreBase
from marco.store.fence import check_fence
from marco.store.models import NodeRow, Search
from marco.store.rows import node_to_row, utcnow

NODE_TABLE = NodeRow.__table__


class WritesMixin(StoreBase):
    """Everything a job writes while it runs."""

    def mark_searches(self, search_ids: Sequence[str], status: str, error: str | None = None, fence: Any = None) -> None:
        """Set the status of searches (a cancel is final); with ``fence`` only while that claim holds the job."""
        if not search_ids:
            return
        values: dict[str, Any] = {"status": status}
        if error is not None:
            values["error"] = error
        if status in ("done", "failed", "cancelled"):
            values["finished_at"] = self._now()
        with self.sessions.begin() as s:
            check_fence(s, fence)
            stmt = update(Search).where(Search.id.in_(list(search_ids)))
            if status != "cancelled":
                stmt = stmt.where(Search.status != "cancelled")  # a cancel is final
            s.execute(stmt.values(**values))

    def write_nodes(
        self, new_nodes: Sequence[Node], updated_nodes: Sequence[Node] = (), session: Session | None = None,
        claim: int | None = None,
    ) -> None:  # fmt: skip
        """One bulk ``INSERT ... ON CONFLICT DO NOTHING`` for ``new_nodes`` and one bulk update of
        ``visits``/``value_sum`` for ``updated_nodes`` (the only columns that change after a write).
        ``claim``: the writing claim's fencing token, kept in ``nodes.claim`` (the caller checks the fence
        in ``session``)."""
        if session is None:
            with self.sessions.begin() as s:
                self.write_nodes(new_nodes, updated_nodes, session=s, claim=claim)
            return
        if new_nodes:
            self._bulk_insert(session, NODE_TABLE, [{**node_to_row(n), "claim": claim} for n in new_nodes])
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

    def write_results(self, results: Sequence[SearchResult], fence: Any = None) -> None:
        """Final answers, scores and costs of finished searches (one bulk UPDATE); with ``fence`` only while
        that claim holds the job, checked in the UPDATE's transaction."""
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
                    "tree_depth": int(r.depth),
                    "path_depth": int(r.path_depth),
                    "error": r.error,
                    "finished_at": now,
                }
            )
        t = Search.__table__
        # bind names must differ from column names in an executemany UPDATE
        # a search cancelled meanwhile stays cancelled: late results never turn it into `done`
        stmt = update(t).where(t.c.id == bindparam("sid"), t.c.status != "cancelled").values({k: bindparam("b_" + k) for k in rows[0] if k != "sid"})
        params = [{("b_" + k if k != "sid" else k): v for k, v in row.items()} for row in rows]
        with self.sessions.begin() as s:
            check_fence(s, fence)
            s.execute(stmt, params)

