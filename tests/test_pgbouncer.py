"""The store through PgBouncer in transaction mode (a private pgbouncer per test, `pgbouncer` fixture).

What transaction pooling breaks, and the product's setting for it (``?pgbouncer=1`` or
``$MARCO_DB_PGBOUNCER=1``): PgBouncer refuses the startup ``options`` the session limits rode on; a
statement psycopg prepared on one server connection is missing (or already there) on the next; a ``SET``
made at connect stays on whichever server connection was lent. With the setting, every transaction sets
the limits for itself (``SET LOCAL``), nothing is prepared, and migrations refuse to run through PgBouncer.
The real-worker run is tests/faults/test_pgbouncer_workers.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from typer.testing import CliRunner

from marco.cli import app
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store, StoreError, make_engine
from marco.store.db import check_connection, is_pgbouncer
from marco.store.migrate import MigrateDirectly
from marco.tasks.base import Problem

runner = CliRunner()
MCTS = SearchConfig(strategy="mcts", action="ministep:6", budget=300, children=2, seed=1)


@pytest.fixture()
def direct(pg_database) -> str:
    """A fresh database, migrated directly (never through PgBouncer)."""
    url = pg_database()
    Store.open(url).close()
    return url


def _server_setting(port: int, db: str, name: str) -> str:
    """``SHOW name`` from a plain client through the pgbouncer (no settings of its own)."""
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={db}", prepare_threshold=None,
                         autocommit=True) as conn:  # fmt: skip
        return str(conn.execute(f"SHOW {name}").fetchone()[0])


def test_without_the_setting_pgbouncer_refuses_the_connection_and_says_what_to_do(direct: str, pgbouncer) -> None:
    bouncer = pgbouncer()
    engine = make_engine(bouncer.url(direct, marked=False))
    with pytest.raises(StoreError, match=r"unsupported startup parameter: options.*\?pgbouncer=1"):
        check_connection(engine)
    engine.dispose()


def test_session_limits_hold_per_transaction_and_never_leak(direct: str, pgbouncer, monkeypatch) -> None:
    bouncer = pgbouncer(pool_size=1)  # every client shares one server connection
    db = direct.rsplit("/", 1)[1]
    for name, seconds in (("MARCO_DB_STATEMENT_TIMEOUT", "2"), ("MARCO_DB_LOCK_TIMEOUT", "1"),
                          ("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT", "1")):
        monkeypatch.setenv(name, seconds)
    engine = make_engine(bouncer.url(direct))
    assert is_pgbouncer(engine)
    try:
        with engine.connect() as conn:
            got = {n: conn.execute(text(f"SHOW {n}")).scalar() for n in ("statement_timeout", "lock_timeout",
                                                                          "idle_in_transaction_session_timeout")}
        assert got == {"statement_timeout": "2s", "lock_timeout": "1s", "idle_in_transaction_session_timeout": "1s"}
        # the one server connection, lent to a plain client next: none of it stayed behind
        assert _server_setting(bouncer.port, db, "statement_timeout") == "0"
        assert _server_setting(bouncer.port, db, "lock_timeout") == "0"

        # statement_timeout
        t0 = time.monotonic()
        with pytest.raises(OperationalError, match="statement timeout"):
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - t0 < 4

        # lock_timeout: a direct connection holds the row
        with make_engine(direct).begin() as setup:
            setup.execute(text("CREATE TABLE held (id int PRIMARY KEY)"))
            setup.execute(text("INSERT INTO held VALUES (1)"))
        holder = psycopg.connect(direct.replace("postgresql+psycopg://", "postgresql://"))
        try:
            holder.execute("SELECT * FROM held WHERE id = 1 FOR UPDATE")
            t0 = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                with engine.begin() as conn:
                    conn.execute(text("UPDATE held SET id = 1 WHERE id = 1"))
            assert time.monotonic() - t0 < 4
        finally:
            holder.close()

        # idle_in_transaction_session_timeout: the server ends a transaction left idle, its locks go with it
        conn = engine.connect()
        conn.execute(text("SELECT * FROM held WHERE id = 1 FOR UPDATE"))
        time.sleep(2.5)
        with pytest.raises(DBAPIError):
            conn.execute(text("SELECT 1"))
        conn.close()
        with engine.begin() as again:  # the row is free, and a new transaction works (pre-ping)
            again.execute(text("UPDATE held SET id = 1 WHERE id = 1"))
        assert _server_setting(bouncer.port, db, "idle_in_transaction_session_timeout") == "0"
    finally:
        engine.dispose()


def test_no_prepared_statements_across_clients(direct: str, pgbouncer) -> None:
    # psycopg prepares a statement after 5 uses; two clients on one server connection would then collide
    # ("prepared statement _pg3_0 already exists" / "does not exist"). The setting turns preparing off.
    bouncer = pgbouncer(pool_size=1)
    engine = make_engine(bouncer.url(direct))
    try:
        a, b = engine.connect(), engine.connect()
        for i in range(12):
            for conn in (a, b):
                assert conn.execute(text("SELECT CAST(:x AS int) + 1"), {"x": i}).scalar() == i + 1
                conn.commit()
        a.close()
        b.close()
    finally:
        engine.dispose()


def test_migrations_run_directly_never_through_pgbouncer(pg_database, pgbouncer) -> None:
    url = pg_database()  # empty
    bouncer = pgbouncer()
    through = bouncer.url(url)
    with pytest.raises(MigrateDirectly, match="marco db upgrade"):
        Store.open(through)
    out = runner.invoke(app, ["db", "upgrade", "--db", through])
    assert out.exit_code == 1 and "do not run through PgBouncer" in out.output, out.output
    assert runner.invoke(app, ["db", "upgrade", "--db", url]).exit_code == 0
    Store.open(through).close()  # current: opens fine
    out = runner.invoke(app, ["db", "downgrade", "0006", "--db", through])
    assert out.exit_code == 1 and "do not run through PgBouncer" in out.output


def test_the_setting_from_the_environment_and_bad_values(direct: str, pgbouncer, monkeypatch, tmp_path: Path) -> None:
    bouncer = pgbouncer()
    monkeypatch.setenv("MARCO_DB_PGBOUNCER", "1")
    engine = make_engine(bouncer.url(direct, marked=False))
    assert is_pgbouncer(engine)
    check_connection(engine)
    engine.dispose()
    assert not is_pgbouncer(make_engine(bouncer.url(direct, marked=False) + "?pgbouncer=0"))  # the URL wins
    monkeypatch.delenv("MARCO_DB_PGBOUNCER")
    with pytest.raises(StoreError, match="1 or 0"):
        make_engine(bouncer.url(direct, marked=False) + "?pgbouncer=maybe")
    with pytest.raises(StoreError, match="PostgreSQL"):
        make_engine(f"sqlite:///{tmp_path / 'x.db'}?pgbouncer=1")


def test_a_batch_runs_and_archives_in_process_through_pgbouncer(direct: str, pgbouncer, tmp_path: Path) -> None:
    bouncer = pgbouncer(pool_size=2)  # the job and its heartbeat share two server connections
    store = Store.open(bouncer.url(direct))
    try:
        problems = [Problem("mgsm", "en", i, f"What is 40 + {i}?", ("42",)) for i in range(4)]
        plan = store.create_batch(problems, [MCTS], model="scripted", task="mgsm", chunk_size=2)
        for job in plan.job_ids:
            assert execute_job(store, job, BackendCache(), "w").status == "done"
        n = store.count_batch_nodes(plan.batch_id)
        assert n > 0 and store.get_batch(plan.batch_id).status == "done"
        # the archive streams through a server-side cursor: inside its transaction, so it works here too
        assert store.archive_batch(plan.batch_id, tmp_path, chunk=10).deleted == n
        assert store.restore_batch(plan.batch_id).rows == n == store.count_batch_nodes(plan.batch_id)
    finally:
        store.close()
    assert "prepared statement" not in bouncer.log()
