"""Engines and sessions: Postgres through psycopg 3 in production, SQLite as the embedded default."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

DEFAULT_URL = "sqlite:///marco.db"
ENV_VAR = "MARCO_DATABASE_URL"


class StoreError(Exception):
    """A store problem with a message fit for the user (one line, says what to do)."""


def default_url() -> str:
    """``$MARCO_DATABASE_URL`` or ``sqlite:///marco.db``."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def normalize_url(url: str) -> str:
    """Use psycopg 3 for Postgres: ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg://``."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # readers (traces, report) never block the writing run
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default :func:`default_url`).

    Raises :class:`StoreError` for a URL SQLAlchemy cannot parse; connection problems surface on first use
    (see :func:`check_connection`).
    """
    url = normalize_url(url or default_url())
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"cannot parse database URL {url!r}: use e.g. sqlite:///marco.db or postgresql://host/db") from exc
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # unknown dialect, missing driver
        raise StoreError(f"cannot use database URL {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def check_connection(engine: Engine) -> None:
    """Raise :class:`StoreError` (one line) when the database does not answer."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0]
        raise StoreError(
            f"database {engine.url.render_as_string(hide_password=True)} does not answer ({reason}); "
            f"check --db or ${ENV_VAR}"
        ) from exc


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine`` that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def is_transient(exc: BaseException) -> bool:
    """True for a database error worth retrying: the connection was lost or refused, or SQLite was busy
    (``OperationalError``, ``InterfaceError``, or any DBAPI error that invalidated its connection).
    Integrity and programming errors are not: retrying them fails the same way."""
    from sqlalchemy.exc import DBAPIError, InterfaceError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OperationalError, InterfaceError)):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False
