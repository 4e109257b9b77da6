"""The store's core: an engine, its sessions, bulk-insert helpers and the database clock.

Every part of :class:`marco.store.store.Store` (queue, planning, writes, reads, training) builds on this.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Engine, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from marco.store import migrate
from marco.store.db import StoreError, check_connection, make_engine, make_session_factory
from marco.store.models import Batch
from marco.store.rows import _chunks, _is_uuid, utcnow


class StoreBase:
    """An engine and its sessions. Thread-safe like its engine; cheap to share."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.sessions = make_session_factory(engine)

    @classmethod
    def open(cls, url: str | None = None, *, upgrade: bool = True, **engine_kwargs: Any) -> Any:
        """Connect to ``url`` (default ``$MARCO_DATABASE_URL`` or ``sqlite:///marco.db``).

        Raises :class:`StoreError` with a one-line reason when the database does not answer.
        """
        engine = make_engine(url, **engine_kwargs)
        check_connection(engine)
        if upgrade:
            migrate.upgrade_on_open(engine)  # under a Postgres advisory lock; refuses a newer schema
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

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

    def _require_batch(self, s: Session, batch_id: str) -> Batch:
        batch = s.get(Batch, batch_id) if _is_uuid(batch_id) else None
        if batch is None:
            raise StoreError(f"no batch {batch_id!r}: list batches with `marco status` or `marco traces list`")
        return batch

