"""Row shapes shared by the store's parts: result dataclasses and row <-> object conversions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from marco.search.tree import Node
from marco.store.models import ProblemRow
from marco.tasks.base import Problem

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


if TYPE_CHECKING:
    from marco.store.fence import Fence


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
    token: int = 0  # jobs.lease_token of this claim (see marco.store.fence)

    @property
    def fence(self) -> "Fence":
        from marco.store.fence import Fence

        return Fence(self.id, self.worker, self.token)


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
    resent: int = 0  # messages the scheduler re-sent for jobs stranded in `queued` (issue 10)
    lease_losses: int = 0  # leases lost by live workers (not deaths)

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
            "resent": self.resent,
            "lease_losses": self.lease_losses,
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



def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True
