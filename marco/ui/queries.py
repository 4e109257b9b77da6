"""The trace explorer's read queries, as plain dicts (what both the HTML pages and ``/api/...`` return).

Every query is a handful of SQL statements whatever the store's size: lists are paginated in SQL, per-batch
figures are ``GROUP BY`` aggregates, and a tree is one indexed range scan of ``nodes`` (``search_id, seq``).
Nothing here writes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import Engine, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from marco.report.html import node_payload
from marco.store.db import StoreError
from marco.store.archive import raise_if_archived
from marco.store.models import Batch, Model, NodeRow, ProblemRow, Search
from marco.store.rows import _is_uuid
from marco.store.store import Store, row_to_node

NODES = NodeRow.__table__
MAX_PER_PAGE = 200


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True)
class SearchFilter:
    """The searches list's filters (every one optional); ``strategy`` matches the strategy or the full label."""

    batch: str | None = None
    strategy: str | None = None
    lang: str | None = None
    dataset: str | None = None
    correct: bool | None = None
    conf_min: float | None = None
    conf_max: float | None = None
    text: str | None = None  # case-insensitive substring of the question
    page: int = 1
    per_page: int = 50

    def __post_init__(self) -> None:
        if self.page < 1:
            raise ValueError("page starts at 1")
        if not 1 <= self.per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}")
        for name in ("conf_min", "conf_max"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a confidence between 0 and 1, got {v}")

    def query(self) -> dict[str, str]:
        """The filters as URL query parameters (what a shareable link carries)."""
        out: dict[str, str] = {}
        for key in ("batch", "strategy", "lang", "dataset", "text"):
            if getattr(self, key):
                out[key] = str(getattr(self, key))
        if self.correct is not None:
            out["correct"] = "yes" if self.correct else "no"
        if self.conf_min is not None:
            out["conf_min"] = f"{self.conf_min:g}"
        if self.conf_max is not None:
            out["conf_max"] = f"{self.conf_max:g}"
        if self.per_page != 50:
            out["per_page"] = str(self.per_page)
        return out


class Explorer:
    """Read-only queries over a store's engine (SQLite or Postgres)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine)
        self.store = Store(engine)  # shares the engine; used for what the store already answers

    # ------------------------------------------------------------------ batches
    def batches(self, limit: int = 200) -> list[dict[str, Any]]:
        """Newest batches first, each with its search counts by status and its accuracy."""
        with self.sessions() as s:
            rows = s.execute(select(Batch).order_by(Batch.created_at.desc()).limit(limit)).scalars().all()
            ids = [r.id for r in rows]
            stats = self._search_stats(s, Search.batch_id.in_(ids), (Search.batch_id,)) if ids else {}
            labels = self._search_stats(s, Search.batch_id.in_(ids), (Search.batch_id, Search.label)) if ids else {}
        out = []
        for b in rows:
            d = self._batch_dict(b, stats.get((str(b.id),), _empty_stats()))
            d["labels"] = [{"label": k[1], **v} for k, v in sorted(labels.items()) if k[0] == str(b.id)]
            out.append(d)
        return out

    def batch(self, batch_id: str) -> dict[str, Any]:
        """One batch with its figures per label × language (what the batch page shows)."""
        with self.sessions() as s:
            b = self._require_batch(s, batch_id)
            total = self._search_stats(s, Search.batch_id == b.id, ()).get((), _empty_stats())
            groups = self._search_stats(s, Search.batch_id == b.id, (Search.label, Search.lang))
            model = s.get(Model, b.model_id) if b.model_id else None
        out = self._batch_dict(b, total)
        out["model"] = model.spec if model else b.config.get("model")
        out["config"] = b.config
        out["groups"] = [{"label": k[0], "lang": k[1], **v} for k, v in sorted(groups.items())]
        return out

    def resolve_batch(self, ref: str) -> str:
        """A batch id from an id or a name (the newest batch of that name), as every command resolves it."""
        return self.store.resolve_batch(ref)

    @staticmethod
    def _require_batch(s: Session, batch_id: str) -> Batch:
        b = s.get(Batch, batch_id) if _is_uuid(batch_id) else None
        if b is None:
            raise StoreError(f"no batch {batch_id!r}")
        return b

    @staticmethod
    def _search_stats(s: Session, where: Any, keys: Sequence[Any]) -> dict[tuple, dict[str, Any]]:
        stmt = select(
            *keys,
            func.count(),
            func.sum(case((Search.status == "done", 1), else_=0)),
            func.sum(case((Search.status == "failed", 1), else_=0)),
            func.sum(case((Search.correct.is_(True), 1), else_=0)),
            func.count(Search.correct),
            func.coalesce(func.sum(Search.tokens), 0),
            func.avg(Search.score),
            func.avg(Search.confidence),
        ).where(where)
        if keys:
            stmt = stmt.group_by(*keys)
        out: dict[tuple, dict[str, Any]] = {}
        for row in s.execute(stmt):
            n, done, failed, correct, scored, tokens, score, conf = row[len(keys):]
            key = tuple(str(k) if isinstance(k, uuid.UUID) else k for k in row[: len(keys)])
            out[key] = {
                "searches": int(n or 0), "done": int(done or 0), "failed": int(failed or 0),
                "correct": int(correct or 0), "scored": int(scored or 0),
                "accuracy": (int(correct or 0) / scored) if scored else None,
                "tokens": int(tokens or 0), "tokens_per_search": (int(tokens or 0) / int(done)) if done else None,
                "mean_score": None if score is None else float(score),
                "mean_confidence": None if conf is None else float(conf),
            }
        return out

    @staticmethod
    def _batch_dict(b: Batch, stats: dict[str, Any]) -> dict[str, Any]:
        planned = b.n_searches or stats["searches"]
        return {
            "id": str(b.id), "name": b.name, "kind": b.kind, "dataset": b.dataset, "status": b.status,
            "created_at": _iso(b.created_at), "started_at": _iso(b.started_at), "finished_at": _iso(b.finished_at),
            "n_problems": b.n_problems, "n_searches": planned,
            "progress": (stats["done"] + stats["failed"]) / planned if planned else None,
            **stats,
        }

    # ------------------------------------------------------------------ searches
    def searches(self, f: SearchFilter) -> dict[str, Any]:
        """One page of searches matching ``f`` (newest first) and how many match in all."""
        where = []
        if f.batch:
            where.append(Search.batch_id == self.resolve_batch(f.batch))
        if f.strategy:
            where.append(or_(Search.strategy == f.strategy, Search.label == f.strategy))
        if f.lang:
            where.append(Search.lang == f.lang)
        if f.dataset:
            where.append(Search.dataset == f.dataset)
        if f.correct is not None:
            where.append(Search.correct.is_(f.correct))
        if f.conf_min is not None:
            where.append(Search.confidence >= f.conf_min)
        if f.conf_max is not None:
            where.append(Search.confidence <= f.conf_max)
        if f.text:
            where.append(ProblemRow.question.icontains(f.text, autoescape=True))
        base = select(Search, ProblemRow).join(ProblemRow, Search.problem_id == ProblemRow.id).where(*where)
        count = select(func.count()).select_from(Search).join(ProblemRow, Search.problem_id == ProblemRow.id).where(*where)
        page = base.order_by(Search.created_at.desc(), Search.id).limit(f.per_page).offset((f.page - 1) * f.per_page)
        with self.sessions() as s:
            total = int(s.execute(count).scalar_one())
            rows = s.execute(page).all()
        return {
            "total": total, "page": f.page, "per_page": f.per_page,
            "pages": max(1, -(-total // f.per_page)), "filters": f.query(),
            "searches": [search_dict(r[0], r[1]) for r in rows],
        }

    def facets(self, batch: str | None = None) -> dict[str, list[str]]:
        """The distinct strategies/labels, languages and datasets (for the filter form)."""
        where = [Search.batch_id == self.resolve_batch(batch)] if batch else []
        with self.sessions() as s:
            labels = sorted({v for v in s.scalars(select(Search.label).where(*where).distinct())})
            strategies = sorted({v for v in s.scalars(select(Search.strategy).where(*where).distinct())})
            langs = sorted({v for v in s.scalars(select(Search.lang).where(*where).distinct())})
            datasets = sorted({v for v in s.scalars(select(Search.dataset).where(*where).distinct())})
        return {"strategies": strategies + [l for l in labels if l not in strategies], "langs": langs, "datasets": datasets}

    def search(self, search_id: str, tokens: Any = None, wait_tokens: bool = True) -> dict[str, Any]:
        """A search, its problem, its model and every node in creation order.

        ``tokens`` (a :class:`marco.ui.tokens.TokenPieces`) adds each node's per-token text pieces; with
        ``wait_tokens=False`` they are None while the model's tokenizer is still loading
        (``pieces_loading`` says so).
        """
        with self.sessions() as s:
            row = s.get(Search, search_id) if _is_uuid(search_id) else None
            if row is None:
                raise StoreError(f"no search {search_id!r}")
            problem = s.get(ProblemRow, row.problem_id)
            model = s.get(Model, row.model_id) if row.model_id else None
            raise_if_archived(s, [str(row.id)])  # an archived batch's tree is a file now: say where, never empty
            nodes = [row_to_node(r) for r in s.execute(
                select(NODES).where(NODES.c.search_id == row.id).order_by(NODES.c.seq)
            )]
        out = search_dict(row, problem)
        out["model"] = model.spec if model else None
        out["config"] = row.config
        out["chosen_path"] = [str(i) for i in row.chosen_path or []]
        chosen = set(out["chosen_path"])
        payload = []
        for n in nodes:
            d = node_payload(n)
            d.update(seq=n.seq, round=n.round, num_tokens=n.num_tokens, q=n.q if n.visits else None,
                     finish_reason=n.finish_reason, chosen=n.id in chosen, reflection=n.kind == "reflection")
            if tokens is not None:
                d["pieces"] = tokens.pieces(out["model"], n.token_ids, n.text, wait_tokens)
            payload.append(d)
        out["nodes"] = payload
        out["pieces_loading"] = bool(tokens is not None and tokens.loading(out["model"]))
        return out

    def related(self, search_id: str) -> list[dict[str, Any]]:
        """Every other search of the same problem (same dataset, language and index) in any batch: other
        strategies, and the same problem before/after SFT."""
        with self.sessions() as s:
            row = s.get(Search, search_id) if _is_uuid(search_id) else None
            if row is None:
                raise StoreError(f"no search {search_id!r}")
            p = s.get(ProblemRow, row.problem_id)
            rows = s.execute(
                select(Search, ProblemRow).join(ProblemRow, Search.problem_id == ProblemRow.id)
                .where(ProblemRow.dataset == p.dataset, ProblemRow.lang == p.lang, ProblemRow.index == p.index,
                       Search.id != row.id)
                .order_by(Search.created_at.desc()).limit(100)
            ).all()
            models = dict(s.execute(select(Model.id, Model.spec)).all())
        out = []
        for r in rows:
            d = search_dict(r[0], r[1])
            d["model"] = models.get(r[0].model_id)
            out.append(d)
        return out

    def node_search(self, node_id: str) -> str:
        """The search a node belongs to."""
        with self.sessions() as s:
            sid = s.execute(select(NODES.c.search_id).where(NODES.c.id == node_id)).scalar() if _is_uuid(node_id) else None
        if sid is None:
            raise StoreError(f"no node {node_id!r}")
        return str(sid)


def _empty_stats() -> dict[str, Any]:
    return {"searches": 0, "done": 0, "failed": 0, "correct": 0, "scored": 0, "accuracy": None, "tokens": 0,
            "tokens_per_search": None, "mean_score": None, "mean_confidence": None}


def search_dict(row: Search, problem: ProblemRow | None) -> dict[str, Any]:
    """A search's row (and its problem) as JSON-ready values."""
    return {
        "id": str(row.id), "batch_id": str(row.batch_id), "problem_id": str(row.problem_id),
        "dataset": row.dataset, "lang": row.lang, "index": problem.index if problem else None,
        "question": problem.question if problem else None,
        "reference": list(problem.reference or []) if problem else [],
        "strategy": row.strategy, "action": row.action, "label": row.label, "status": row.status,
        "answer": row.final_answer, "correct": row.correct, "score": row.score, "confidence": row.confidence,
        "tokens": row.tokens, "rounds": row.rounds, "elapsed_s": row.elapsed_s, "error": row.error,
        "final_node_id": None if row.final_node_id is None else str(row.final_node_id),
        "created_at": _iso(row.created_at), "finished_at": _iso(row.finished_at),
    }
