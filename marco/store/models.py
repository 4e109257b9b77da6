"""The store's tables as SQLAlchemy 2 typed ORM models.

Every table has a client-generated ``id`` and a ``created_at``. Columns are named plainly because users
query them directly (see ``docs/schema.md``). Changing anything here needs an Alembic migration:
``marco db check`` fails while models and migrations disagree.

Issue 5 (synthesis/SFT) adds ``cot_examples`` and ``training_runs`` in a migration of its own; ``models``
already carries the lineage columns (``parent_id``, ``path``) a trained checkpoint needs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    text,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from marco.store.types import FloatArray, IdType, IntArray, JsonDoc

# Deterministic constraint names, so migrations can drop/alter them on every backend (SQLite batch mode).
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BATCH_KINDS = ("reason", "synthesize", "train")
BATCH_STATUSES = ("queued", "running", "done", "failed", "cancelled")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
SEARCH_STATUSES = ("pending", "running", "done", "failed", "cancelled")
NODE_KINDS = ("root", "step", "ministep", "rollout", "reflection", "answer")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class _Row:
    """Columns every table has."""

    id: Mapped[str] = mapped_column(IdType, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP"))


class Model(_Row, Base):
    """A base model or a trained checkpoint (``parent_id`` is the model it was trained from)."""

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[str] = mapped_column(String(500), unique=True)  # what `load_backend` takes
    kind: Mapped[str] = mapped_column(String(16), default="base")  # base | checkpoint
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    path: Mapped[str | None] = mapped_column(Text)  # checkpoint directory
    meta: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


class Batch(_Row, Base):
    """One unit of submitted work: a `marco run`/`submit` (reason), a synthesis or a training stage."""

    __tablename__ = "batches"
    __table_args__ = (
        CheckConstraint(_one_of("kind", BATCH_KINDS), name="kind"),
        CheckConstraint(_one_of("status", BATCH_STATUSES), name="status"),
        Index(None, "status", "priority"),
        Index(None, "name"),  # 0004: names resolve to batches on every `report NAME` / explorer request
    )

    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16), default="reason")
    dataset: Mapped[str | None] = mapped_column(String(100), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    n_problems: Mapped[int] = mapped_column(Integer, default=0)
    n_jobs: Mapped[int] = mapped_column(Integer, default=0)
    n_searches: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # 0007 (issue 18): an ended batch's tree nodes moved to a compressed file (`marco archive`): when, where,
    # how many rows and the file's SHA-256 (checked before a restore). NULL: its nodes are in `nodes`.
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    archive_path: Mapped[str | None] = mapped_column(Text)
    archive_rows: Mapped[int | None] = mapped_column(BigInteger)
    archive_sha256: Mapped[str | None] = mapped_column(String(64))


class Job(_Row, Base):
    """A chunk of a batch that one worker executes under a lease (``lease_until``)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),
        UniqueConstraint("batch_id", "seq"),
        Index(None, "status", "lease_until"),
    )

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # position within the batch
    kind: Mapped[str] = mapped_column(String(16), default="reason")
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)  # {"problem_ids": [...]}
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # issue 10: when the job's message was last sent (the scheduler re-sends a job queued this long with no
    # claim), how often the scheduler re-sent it, and how often a live worker lost its lease (not a death)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), server_default=text("CURRENT_TIMESTAMP"))
    resends: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    lease_losses: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # issue 17: the claim's fencing token (grows by one per claim; every write of the job's results checks
    # it), leases that ran out (deaths, less the ones a live worker reported as lost) and hand-backs by a
    # live worker (warm shutdown, model server down): only deaths count toward max_attempts
    lease_token: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    expiries: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    releases: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # the re-send back-off step since the job's last claim (`resends` keeps counting for `marco status`)
    resend_step: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class ProblemRow(_Row, Base):
    """One dataset item as a batch saw it (malformed rows keep their ``error``)."""

    __tablename__ = "problems"
    __table_args__ = (
        UniqueConstraint("batch_id", "dataset", "lang", "index"),
        Index(None, "dataset", "lang", "index"),
    )

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    dataset: Mapped[str] = mapped_column(String(100))
    lang: Mapped[str] = mapped_column(String(32))
    index: Mapped[int] = mapped_column(Integer)
    question: Mapped[str] = mapped_column(Text)
    reference: Mapped[list[str]] = mapped_column(JsonDoc, default=list)  # every accepted reference
    error: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


class Search(_Row, Base):
    """One search of one problem with one configuration, and its outcome."""

    __tablename__ = "searches"
    __table_args__ = (
        CheckConstraint(_one_of("status", SEARCH_STATUSES), name="status"),
        Index(None, "dataset", "lang", "strategy"),
        Index(None, "batch_id", "label", "lang"),
        Index(None, "strategy", "correct"),
        Index(None, "created_at"),  # 0004: newest-first pages of `traces list` and the explorer
    )

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    problem_id: Mapped[str] = mapped_column(ForeignKey("problems.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    dataset: Mapped[str] = mapped_column(String(100))
    lang: Mapped[str] = mapped_column(String(32))
    strategy: Mapped[str] = mapped_column(String(16))  # greedy | sc | bon | mcts
    action: Mapped[str] = mapped_column(String(32))  # step | ministep:N
    label: Mapped[str] = mapped_column(String(100))  # e.g. mcts/ministep:32+reflect
    config: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)  # the full SearchConfig
    status: Mapped[str] = mapped_column(String(16), default="pending")
    final_answer: Mapped[str | None] = mapped_column(Text)
    final_node_id: Mapped[str | None] = mapped_column(IdType)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    elapsed_s: Mapped[float] = mapped_column(Float, default=0.0)
    chosen_path: Mapped[list[str]] = mapped_column(JsonDoc, default=list)  # node ids root → final
    tree_depth: Mapped[int | None] = mapped_column(Integer)  # 0006: deepest non-rollout node
    path_depth: Mapped[int | None] = mapped_column(Integer)  # 0006: deepest non-rollout node of chosen_path
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class NodeRow(_Row, Base):
    """One node of a search tree. Only ``visits``/``value_sum`` change after it is written."""

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint(_one_of("kind", NODE_KINDS), name="kind"),
        Index(None, "search_id", "seq"),
    )

    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"))
    parent_id: Mapped[str | None] = mapped_column(IdType, index=True)
    seq: Mapped[int] = mapped_column(Integer)  # creation order within the search
    round: Mapped[int] = mapped_column(Integer, default=0)
    sibling_index: Mapped[int] = mapped_column(Integer, default=0)
    depth: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    token_ids: Mapped[list[int]] = mapped_column(IntArray, default=list)
    confidences: Mapped[list[float]] = mapped_column(FloatArray, default=list)
    num_tokens: Mapped[int] = mapped_column(Integer, default=0)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)
    value_sum: Mapped[float] = mapped_column(Float, default=0.0)
    visits: Mapped[int] = mapped_column(Integer, default=0)
    terminal: Mapped[bool] = mapped_column(Boolean, default=False)
    answer: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # issue 17: the fencing token (jobs.lease_token) of the claim that wrote this node: a search's nodes in
    # `seq` order carry non-decreasing claims unless two runs of its job wrote at once (bench/soak.py checks)
    claim: Mapped[int | None] = mapped_column(BigInteger)


# --- data loop (issue 5): synthesised CoT examples and training runs ------------------------------------
COT_KINDS = ("sft", "preference")
TRAINING_STATUSES = ("queued", "running", "done", "failed")


class CotExampleRow(_Row, Base):
    """One CoT training example synthesised from a stored search path (``kind`` sft), or a preference pair
    (``kind`` preference: ``messages`` ends with the preferred answer, ``rejected`` holds the other one).

    ``run_id`` is the synthesis batch that made it; ``search_id``/``node_path`` say exactly which tree path
    it came from, so every training example can be traced back to the nodes that produced it.
    """

    __tablename__ = "cot_examples"
    __table_args__ = (
        CheckConstraint(_one_of("kind", COT_KINDS), name="kind"),
        Index(None, "run_id", "kind"),
        Index(None, "dataset", "lang"),
    )

    run_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default="sft")
    source_batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"), index=True)
    search_id: Mapped[str | None] = mapped_column(ForeignKey("searches.id", ondelete="SET NULL"), index=True)
    problem_id: Mapped[str | None] = mapped_column(IdType)
    node_path: Mapped[list[str]] = mapped_column(JsonDoc, default=list)  # node ids root → answer
    messages: Mapped[list[dict[str, str]]] = mapped_column(JsonDoc, default=list)
    rejected: Mapped[str | None] = mapped_column(Text)  # preference pairs: the dispreferred answer
    rejected_search_id: Mapped[str | None] = mapped_column(IdType)
    rejected_path: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    answer: Mapped[str | None] = mapped_column(Text)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    quality: Mapped[float] = mapped_column(Float, default=1.0)  # the path's value (mean token confidence)
    dataset: Mapped[str | None] = mapped_column(String(100))
    lang: Mapped[str] = mapped_column(String(32), default="")
    meta: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


class TrainingRun(_Row, Base):
    """One SFT run: base model, data, hyperparameters, loss per step, final metrics, checkpoint."""

    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_one_of("status", TRAINING_STATUSES), name="status"),)

    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[str | None] = mapped_column(IdType)
    base: Mapped[str] = mapped_column(String(500))  # the base model spec as given
    base_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    output_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), index=True)
    data: Mapped[str] = mapped_column(Text)  # the data source as given (a path, or synthesis:ID)
    data_path: Mapped[str | None] = mapped_column(Text)  # what training read
    synthesis_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"))
    n_examples: Mapped[int | None] = mapped_column(Integer)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    losses: Mapped[list[float]] = mapped_column(JsonDoc, default=list)  # loss per optimizer step
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    checkpoint: Mapped[str | None] = mapped_column(Text)  # directory `from_pretrained` loads
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
