"""Shared test fixtures."""

from __future__ import annotations

# --- store: a fresh Postgres database per test session, and SQLite -------------------------------------
import os
import uuid
from typing import Callable, Iterator

import pytest

PG_ADMIN_URL = os.environ.get("MARCO_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _pg_admin(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh, uniquely named Postgres databases (``marco_test_<random>``); every one is
    dropped when the session ends."""
    made: list[str] = []
    base = PG_ADMIN_URL.rsplit("/", 1)[0]

    def create() -> str:
        name = f"marco_test_{uuid.uuid4().hex[:12]}"
        _pg_admin(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    yield create
    for name in made:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url(pg_database: Callable[[], str]) -> str:
    """The session's shared Postgres database (tests keep apart by using their own batch ids)."""
    return pg_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database URL: a fresh SQLite file, or the session's Postgres database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'marco.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture()
def store(db_url: str):
    """A migrated :class:`marco.store.Store` on ``db_url``."""
    from marco.store import Store

    s = Store.open(db_url)
    yield s
    s.close()
# --- end store fixtures -------------------------------------------------------------------------------


# --- tasks: the evaluation data ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_dir():
    """The data shipped with marco (``marco/datasets``: MGSM, FLORES-200 zh-en) as a Path; always there."""
    from marco.tasks.data import PACKAGED_DIR

    return PACKAGED_DIR


@pytest.fixture(scope="session")
def wmt22_dir():
    """The folder holding WMT22 zh-en (``$MARCO_DATA_DIR/translation/...`` or ``../shared/data/translation/...``
    beside the repository). WMT22 is never shipped; tests that need it skip without it."""
    from pathlib import Path

    from marco.tasks.translation import WMT_DIR

    root = Path(__file__).resolve().parents[1]
    for base in (os.environ.get("MARCO_DATA_DIR"), root.parent / "shared" / "data"):
        if base and (Path(base) / "translation" / WMT_DIR).is_dir():
            return Path(base) / "translation" / WMT_DIR
    pytest.skip("WMT22 zh-en not found (research use, not shipped): set MARCO_DATA_DIR or put it at ../shared/data")
# --- end tasks fixtures ---------------------------------------------------------------------------------


# --- queue: a dedicated Redis database per test session -------------------------------------------------
REDIS_HOST_URL = os.environ.get("MARCO_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://127.0.0.1:6379/<n>`` for an empty database number this session claims (flushed at the end)."""
    import redis

    token = uuid.uuid4().hex
    for n in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS_HOST_URL}/{n}")
        # Claim it atomically: the marker key exists only in a database nobody else uses.
        if client.dbsize() == 0 and client.set("marco:test-session", token, nx=True):
            break
    else:
        pytest.skip("no free Redis database number (1-15) for the queue tests")
    try:
        yield f"{REDIS_HOST_URL}/{n}"
    finally:
        client.flushdb()
        client.close()
# --- end queue fixtures ---------------------------------------------------------------------------------


# --- the real model, loaded once per test session ------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct through the transformers backend (CPU)."""
    from marco.llm import load_backend

    return load_backend("smollm2")
