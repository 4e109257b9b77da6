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

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(engine: Engine | None = None) -> Config:
    """The project's Alembic config; with ``engine`` it migrates that database."""
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["configure_logger"] = False
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def _run(engine: Engine, fn: Any, *args: Any) -> None:
    cfg = alembic_config(engine)
    with engine.begin() as conn:
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
            f"database {engine.url.render_as_string(hide_password=True)} has schema revision {current!r}, newer "
            f"than this code knows (latest {head_revision()!r}): upgrade Marco on this machine before starting it"
        )


def upgrade_on_open(engine: Engine) -> None:
    """Bring the schema to head, once, however many processes open the database at the same moment.

    On Postgres the check and the upgrade run under a session-level advisory lock, so the first process
    migrates and the others wait, then find it current. SQLite serialises writers by itself.
    """
    check_not_newer(engine)
    if is_current(engine):
        return
    if engine.dialect.name != "postgresql":
        upgrade(engine)
        return
    from sqlalchemy import text

    with engine.connect() as lock_conn:
        lock_conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        try:
            check_not_newer(engine)
            if not is_current(engine):
                upgrade(engine)
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            lock_conn.commit()
