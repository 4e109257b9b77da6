"""Alembic: upgrade → downgrade → upgrade on Postgres and SQLite, and `marco db check`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import Column, Integer, inspect, text
from typer.testing import CliRunner

from marco.cli import app
from marco.store import make_engine, migrate
from marco.store.models import Base

runner = CliRunner()
TABLES = {"models", "batches", "jobs", "problems", "searches", "nodes"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    create: Callable[[], str] = request.getfixturevalue("pg_database")
    return create()


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    engine = make_engine(empty_url)
    out = runner.invoke(app, ["db", "check", "--db", empty_url])
    assert out.exit_code == 1 and "marco db upgrade" in out.output  # an empty database is not current
    out = runner.invoke(app, ["db", "upgrade", "--db", empty_url])
    assert out.exit_code == 0, out.output
    assert TABLES <= set(inspect(engine).get_table_names())
    assert migrate.diff(engine) == []
    migrate.downgrade(engine, "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    assert migrate.current_revision(engine) is None
    migrate.upgrade(engine)
    assert migrate.is_current(engine) and TABLES <= set(inspect(engine).get_table_names())
    out = runner.invoke(app, ["db", "check", "--db", empty_url])
    assert out.exit_code == 0, out.output
    engine.dispose()


def test_check_fails_when_models_and_migrations_disagree(empty_url: str) -> None:
    engine = make_engine(empty_url)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_nodes_parent_id"))
    out = runner.invoke(app, ["db", "check", "--db", empty_url])
    assert out.exit_code == 1 and "disagree" in out.output
    # and the other way round: a model column no migration creates
    migrate.upgrade(engine, "head")
    table = Base.metadata.tables["batches"]
    extra = Column("not_migrated", Integer)
    table.append_column(extra)
    try:
        assert any("not_migrated" in str(d) for d in migrate.diff(engine))
    finally:
        table._columns.remove(extra)
    engine.dispose()
