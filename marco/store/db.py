"""Engines and sessions: Postgres through psycopg 3 in production, SQLite as the embedded default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from marco.store.urls import redact, safe_url

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


@dataclass(frozen=True)
class SessionLimits:
    """Limits every Postgres connection of the product sets at connect (``options=-c ...`` and libpq
    keepalives), so a client lost mid-transaction never holds row locks for long:

    - ``idle_in_transaction_s``: a transaction idle that long is ended by the server, its locks released
      (a worker hung or cut off mid-round); ``$MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT``;
    - ``lock_timeout_s``: a statement waits at most that long for a lock (the scheduler behind a lost
      worker's row lock fails that phase and retries next tick); ``$MARCO_DB_LOCK_TIMEOUT``;
    - ``statement_timeout_s``: one statement runs at most that long (migrations are exempt);
      ``$MARCO_DB_STATEMENT_TIMEOUT``;
    - ``keepalives_idle_s``: TCP keepalives after that much silence (then every ``keepalive_interval_s``,
      ``keepalive_count`` probes): a dead host's connection is noticed in about a minute instead of the
      kernel's two hours, on both ends (libpq's ``keepalives*`` and the server's ``tcp_keepalives_*``);
      ``$MARCO_DB_KEEPALIVES_IDLE``.

    0 turns a limit off.
    """

    idle_in_transaction_s: int = 120
    lock_timeout_s: int = 30
    statement_timeout_s: int = 600
    keepalives_idle_s: int = 30
    keepalive_interval_s: int = 10
    keepalive_count: int = 3

    @classmethod
    def from_env(cls, env: Any = None) -> "SessionLimits":
        env = os.environ if env is None else env

        def seconds(name: str, default: int) -> int:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = int(raw)
            except ValueError:
                raise StoreError(f"${name} must be a whole number of seconds (0: no limit), got {raw!r}") from None
            if value < 0:
                raise StoreError(f"${name} must be 0 or more seconds, got {value}")
            return value

        return cls(
            idle_in_transaction_s=seconds("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT", cls.idle_in_transaction_s),
            lock_timeout_s=seconds("MARCO_DB_LOCK_TIMEOUT", cls.lock_timeout_s),
            statement_timeout_s=seconds("MARCO_DB_STATEMENT_TIMEOUT", cls.statement_timeout_s),
            keepalives_idle_s=seconds("MARCO_DB_KEEPALIVES_IDLE", cls.keepalives_idle_s),
        )

    def timeouts(self) -> tuple[tuple[str, int], ...]:
        """``(setting, milliseconds)`` of the statement-level limits (0: off)."""
        return (
            ("idle_in_transaction_session_timeout", self.idle_in_transaction_s * 1000),
            ("lock_timeout", self.lock_timeout_s * 1000),
            ("statement_timeout", self.statement_timeout_s * 1000),
        )

    def per_transaction_sql(self) -> str:
        """One statement that sets the limits for the current transaction only (``set_config(..., true)``,
        i.e. ``SET LOCAL``): what a connection behind PgBouncer in transaction mode runs as the first
        statement of every transaction, since a setting made at connect would stay on whichever server
        connection PgBouncer lent at the time, and the startup ``options`` are refused."""
        return "SELECT " + ", ".join(f"set_config('{name}', '{ms}', true)" for name, ms in self.timeouts())

    def connect_args(self, pgbouncer: bool = False) -> dict[str, Any]:
        """psycopg/libpq connection arguments that set these limits. ``pgbouncer``: through PgBouncer in
        transaction mode: no ``options`` (PgBouncer refuses them; the limits are set per transaction
        instead, see :meth:`per_transaction_sql`), no server-side prepared statements
        (``prepare_threshold=None``: a statement prepared on one server connection is unknown on the next),
        libpq keepalives towards PgBouncer kept."""
        if pgbouncer:
            args: dict[str, Any] = {"connect_timeout": 5, "prepare_threshold": None}
            if self.keepalives_idle_s:
                args.update(keepalives=1, keepalives_idle=self.keepalives_idle_s,
                            keepalives_interval=self.keepalive_interval_s, keepalives_count=self.keepalive_count)  # fmt: skip
            return args
        options = " ".join(
            f"-c {name}={seconds * 1000}"
            for name, seconds in (
                ("idle_in_transaction_session_timeout", self.idle_in_transaction_s),
                ("lock_timeout", self.lock_timeout_s),
                ("statement_timeout", self.statement_timeout_s),
            )
        )
        if self.keepalives_idle_s:  # the server's side too: it is the server that holds a lost client's locks
            options += (f" -c tcp_keepalives_idle={self.keepalives_idle_s}"
                        f" -c tcp_keepalives_interval={self.keepalive_interval_s}"
                        f" -c tcp_keepalives_count={self.keepalive_count}")  # fmt: skip
        args: dict[str, Any] = {"connect_timeout": 5, "options": options}
        if self.keepalives_idle_s:
            args.update(keepalives=1, keepalives_idle=self.keepalives_idle_s,
                        keepalives_interval=self.keepalive_interval_s, keepalives_count=self.keepalive_count)  # fmt: skip
        return args


PGBOUNCER_ENV = "MARCO_DB_PGBOUNCER"
PGBOUNCER_PARAM = "pgbouncer"  # postgresql://host:6432/marco?pgbouncer=1
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _flag(value: str, what: str) -> bool:
    value = value.strip().lower()
    if value not in _TRUE + _FALSE:
        raise StoreError(f"{what} must be 1 or 0 (true/false), got {value!r}")
    return value in _TRUE


def is_pgbouncer(engine: Engine) -> bool:
    """True for an engine made for PgBouncer in transaction mode (see :func:`make_engine`)."""
    return bool(engine.get_execution_options().get("marco_pgbouncer"))


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default :func:`default_url`); on Postgres its connections carry the product's
    :class:`SessionLimits` (``connect_args`` given here win).

    **PgBouncer in transaction mode**: a Postgres URL with ``?pgbouncer=1`` (the parameter is removed before
    connecting), or ``$MARCO_DB_PGBOUNCER=1`` for every Postgres URL of the process. Connections then send
    no startup ``options`` and prepare no statements, and every transaction starts by setting the
    session limits for itself (``SET LOCAL``), so they hold whichever server connection PgBouncer lends.
    Migrations never run through such an engine (:mod:`marco.store.migrate`): ``marco db upgrade`` must
    connect to Postgres directly.

    Raises :class:`StoreError` for a URL SQLAlchemy cannot parse; connection problems surface on first use
    (see :func:`check_connection`).
    """
    url = normalize_url(url or default_url())
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(
            f"cannot parse database URL {safe_url(url)!r}: use e.g. sqlite:///marco.db or postgresql://host/db"
        ) from None
    pgbouncer = False
    if parsed.get_backend_name() == "postgresql":
        param = parsed.query.get(PGBOUNCER_PARAM)
        if isinstance(param, tuple):
            param = param[-1]
        pgbouncer = _flag(param, f"the URL's ?{PGBOUNCER_PARAM}=") if param is not None else \
            _flag(os.environ.get(PGBOUNCER_ENV, ""), f"${PGBOUNCER_ENV}")  # fmt: skip
        parsed = parsed.difference_update_query([PGBOUNCER_PARAM])
        limits = SessionLimits.from_env()
        kwargs.setdefault("pool_pre_ping", True)
        kwargs["connect_args"] = {**limits.connect_args(pgbouncer=pgbouncer), **kwargs.get("connect_args", {})}
    elif parsed.query.get(PGBOUNCER_PARAM) is not None:
        raise StoreError(f"?{PGBOUNCER_PARAM}= is for PostgreSQL URLs, not {safe_url(parsed)!r}")
    try:
        engine = create_engine(parsed, **kwargs)
    except Exception as exc:  # unknown dialect, missing driver
        raise StoreError(f"cannot use database URL {safe_url(url)!r}: {redact(str(exc))}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if pgbouncer:
        engine.update_execution_options(marco_pgbouncer=True)
        event.listen(engine, "begin", _limits_per_transaction(limits.per_transaction_sql()))
    return engine


def _limits_per_transaction(sql: str) -> Any:
    """A ``begin`` listener that runs ``sql`` (the session limits, transaction-local) first in every
    transaction of a connection that is not in autocommit mode."""

    def begin(conn: Any) -> None:
        dbapi = conn.connection.dbapi_connection
        if dbapi is not None and not getattr(dbapi, "autocommit", False):
            conn.exec_driver_sql(sql)

    return begin


POOL_SIZE_ENV = "MARCO_DB_POOL_SIZE"
MAX_OVERFLOW_ENV = "MARCO_DB_MAX_OVERFLOW"


def pool_kwargs(env: Any = None) -> dict[str, int]:
    """Connection-pool size of one process from ``$MARCO_DB_POOL_SIZE`` / ``$MARCO_DB_MAX_OVERFLOW`` (only
    those set; SQLAlchemy's defaults are 5 + 10 overflow). A worker process sets its own (see
    ``worker/runtime.py``): every connection is a Postgres backend, and a fleet of workers multiplies them."""
    env = os.environ if env is None else env
    out: dict[str, int] = {}
    for name, key, low in ((POOL_SIZE_ENV, "pool_size", 1), (MAX_OVERFLOW_ENV, "max_overflow", 0)):
        raw = (env.get(name) or "").strip()
        if raw:
            try:
                out[key] = int(raw)
            except ValueError:
                raise StoreError(f"${name} must be a whole number, got {raw!r}") from None
            if out[key] < low:
                raise StoreError(f"${name} must be at least {low}, got {out[key]}")
    return out


def check_connection(engine: Engine) -> None:
    """Raise :class:`StoreError` (one line) when the database does not answer."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = redact(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc).splitlines()[0])
        if "unsupported startup parameter" in reason and not is_pgbouncer(engine):
            raise StoreError(
                f"database {safe_url(engine.url)} refused the connection's settings ({reason}): is it PgBouncer? "
                f"Add ?{PGBOUNCER_PARAM}=1 to the URL (or set ${PGBOUNCER_ENV}=1)"
            ) from exc
        raise StoreError(
            f"database {safe_url(engine.url)} does not answer ({reason}); "
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
