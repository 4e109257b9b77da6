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
    """The bundled SmolLM2-135M-Instruct through the transformers backend (CPU), in float32 whatever the CPU:
    the tests compare it with exact references (an independent forward pass, greedy one by one); bfloat16's
    agreement with it is tests/test_precision.py's."""
    from marco.llm import load_backend

    return load_backend("smollm2", dtype="float32")


# --- PgBouncer: a private pgbouncer process in transaction mode in front of the test Postgres ------------
PGBOUNCER_CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


class PgBouncer:
    """A started ``pgbouncer`` (its own config in a temporary folder; stopped by pid at the end)."""

    def __init__(self, popen, port: int, log, upstream: str) -> None:
        self.popen, self.port, self.log_path, self.upstream = popen, port, log, upstream

    def url(self, database_url: str, marked: bool = True) -> str:
        """``database_url`` (postgresql://…@127.0.0.1:5432/DB) through this pgbouncer; ``marked``: with
        ``?pgbouncer=1``, what the product needs to use it."""
        through = database_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{self.port}/")
        assert through != database_url, database_url
        return through + ("?pgbouncer=1" if marked else "")

    def show(self, what: str) -> list[dict[str, object]]:
        """``SHOW POOLS`` / ``SHOW SERVERS`` / ... on the admin console, as dicts."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=pgbouncer", autocommit=True,
                             prepare_threshold=None) as conn:  # fmt: skip
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture()
def pgbouncer(tmp_path) -> Iterator[Callable[..., PgBouncer]]:
    """``start(pool_size=4)``: a private PgBouncer in ``pool_mode = transaction`` (``auth_type = trust``, an
    ``auth_file`` naming user postgres) on a free port, in front of 127.0.0.1:5432 (every database name
    maps to the same name there); stopped at the end. Skips when no pgbouncer binary is installed
    (``scripts/services.sh`` installs Debian's). As root it runs as user postgres (pgbouncer refuses root)."""
    import pwd
    import shutil
    import signal
    import socket
    import subprocess
    import time

    binary = next((p for p in (shutil.which(c) or (c if os.path.isabs(c) and os.access(c, os.X_OK) else None)
                               for c in PGBOUNCER_CANDIDATES) if p), None)  # fmt: skip
    if binary is None:
        pytest.skip("pgbouncer is not installed (scripts/services.sh installs it: apt-get install pgbouncer)")
    started: list[PgBouncer] = []

    def start(pool_size: int = 4, **settings: object) -> PgBouncer:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        folder = tmp_path / f"pgbouncer-{port}"
        folder.mkdir()
        (folder / "users.txt").write_text('"postgres" ""\n')
        extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
        (folder / "pgbouncer.ini").write_text(
            "[databases]\n* = host=127.0.0.1 port=5432\n\n[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\nadmin_users = postgres\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n"
            "ignore_startup_parameters = extra_float_digits\n" + extra
        )
        cmd = [binary]
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
                cmd += ["-u", "postgres"]
            except KeyError:
                cmd += ["-u", "nobody"]
        log = folder / "pgbouncer.log"
        with open(log, "wb") as handle:
            popen = subprocess.Popen([*cmd, str(folder / "pgbouncer.ini")], stdout=handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        bouncer = PgBouncer(popen, port, log, "127.0.0.1:5432")
        started.append(bouncer)
        deadline = time.monotonic() + 15
        while True:
            if popen.poll() is not None:
                pytest.fail(f"pgbouncer exited ({popen.returncode}): {bouncer.log()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return bouncer
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer not listening on {port} after 15 s: {bouncer.log()[-2000:]}")
                time.sleep(0.1)

    yield start
    for b in started:
        if b.popen.poll() is None:
            os.killpg(b.popen.pid, signal.SIGTERM)
            try:
                b.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(b.popen.pid, signal.SIGKILL)
                b.popen.wait(5)
# --- end PgBouncer fixtures -------------------------------------------------------------------------------
