"""Alembic, driven from Python: upgrade/downgrade a database and compare it with the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from marco.store.db import StoreError
from marco.store.models import Base
from marco.store.urls import safe_url

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(engine: Engine | None = None) -> Config:
    """The project's Alembic config; with ``engine`` it migrates that database."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["configure_logger"] = False
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


class MigrateDirectly(StoreError):
    """A migration asked of an engine that goes through PgBouncer in transaction mode."""


def refuse_through_pgbouncer(engine: Engine, why: str = "") -> None:
    """Raise :class:`MigrateDirectly` for a PgBouncer engine: migrations connect to Postgres directly."""
    from marco.store.db import is_pgbouncer

    if is_pgbouncer(engine):
        raise MigrateDirectly(
            f"{why}migrations do not run through PgBouncer ({safe_url(engine.url)} is marked ?pgbouncer=1 or "
            "$MARCO_DB_PGBOUNCER=1): run `marco db upgrade --db postgresql://USER@POSTGRES_HOST:5432/DB` "
            "against Postgres itself, then start the workers"
        )


def _run(engine: Engine, fn: Any, *args: Any) -> None:
    refuse_through_pgbouncer(engine)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # a migration may rewrite a large table: the product's session limits are for its own statements
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
        cfg.attributes["connection"] = conn
        fn(cfg, *args)


def upgrade(engine: Engine, revision: str = "head") -> None:
    _run(engine, command.upgrade, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    _run(engine, command.downgrade, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def diff(engine: Engine) -> list[Any]:
    """Autogenerate's differences between the database and the models (empty when they agree)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "target_metadata": Base.metadata}
        )
        return list(compare_metadata(ctx, Base.metadata))


MIGRATION_LOCK = 0x6D6172636F  # "marco": the pg_advisory_lock key every process takes around an upgrade


def known_revisions() -> set[str]:
    """Every revision this code's migrations know."""
    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


class SchemaTooNew(StoreError):
    """The database's schema is newer than this code: this process must not write to it."""


def check_not_newer(engine: Engine) -> None:
    """Raise :class:`SchemaTooNew` (a :class:`~marco.store.db.StoreError`) when the database was migrated by newer code (its revision is
    unknown here): an older worker must not write rows whose meaning it does not know."""
    current = current_revision(engine)
    if current is not None and current not in known_revisions():
        raise SchemaTooNew(
            f"database {safe_url(engine.url)} has schema revision {current!r}, newer "
            f"than this code knows (latest {head_revision()!r}): upgrade Marco on this machine before starting it"
        )


_UNLIMITED = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")


def upgrade_on_open(engine: Engine) -> None:
    """Bring the schema to head, once, however many processes open the database at the same moment.

    On Postgres the check and the upgrade run under a session-level advisory lock, so the first process
    migrates and the others wait, then find it current. SQLite serialises writers by itself. Through
    PgBouncer (transaction mode) nothing is migrated: a schema behind this code raises
    :class:`MigrateDirectly` saying to run ``marco db upgrade`` against Postgres itself.
    """
    check_not_newer(engine)
    if is_current(engine):
        return
    refuse_through_pgbouncer(engine, f"the database is at schema revision {current_revision(engine) or 'none'}, "
                                     f"this code needs {head_revision()}, and ")  # fmt: skip
    if engine.dialect.name != "postgresql":
        upgrade(engine)
        return
    from sqlalchemy import text

    with engine.connect() as lock_conn:
        # waiting for another process's migration, and holding the lock idle while ours runs, are no
        # abandoned transaction: lift the session limits (marco.store.db) on this connection meanwhile
        for name in _UNLIMITED:
            lock_conn.exec_driver_sql(f"SET {name} = 0")
        lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        try:
            check_not_newer(engine)
            if not is_current(engine):
                upgrade(engine)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            for name in _UNLIMITED:
                lock_conn.exec_driver_sql(f"SET {name} TO DEFAULT")  # back to the connection's own limits
            lock_conn.commit()
