"""Fault-suite fixtures: a fresh Postgres database reached through a TCP proxy the test can cut, the session's
own Redis database, real `celery worker` processes and an in-process scheduler (helpers: fault_kit.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fault_kit import LEASE_S, PgProxy, SchedulerThread  # noqa: E402
from marco.store import Store  # noqa: E402
from scheduler.dispatch import CeleryDispatcher  # noqa: E402
from worker.harness import Proc, start_worker  # noqa: E402
from worker.settings import QueueSettings  # noqa: E402

IDLE_IN_TRANSACTION_S = 10  # the server ends a transaction its client lost after this long


@pytest.fixture()
def proxy() -> Iterator[PgProxy]:
    p = PgProxy()
    yield p
    p.cut()


@pytest.fixture()
def fault_env(pg_database, redis_url, proxy, monkeypatch) -> dict[str, str]:
    """A fresh database (reached through the proxy) and the session's Redis database, emptied first.

    Time runs fast here (4 s leases), and so does the server's end of a transaction its client lost in a
    cut (120 s in production): a row lock held across a cut otherwise stalls the scheduler's requeue for two
    minutes, longer than a test waits (a Postgres-restart run ended with one job still running after 240 s).
    The in-process scheduler reads it from this process's environment, the workers from theirs."""
    import redis

    monkeypatch.setenv("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT", str(IDLE_IN_TRANSACTION_S))

    direct = pg_database()
    Store.open(direct).close()  # migrate before any worker starts
    redis.Redis.from_url(redis_url).flushdb()
    return {
        "MARCO_BROKER_URL": redis_url,
        "MARCO_DATABASE_URL": proxy.url(direct),
        "MARCO_DIRECT_DATABASE_URL": direct,
        "MARCO_LEASE_SECONDS": str(LEASE_S),
        "MARCO_RETRY_BACKOFF_MAX": "8",
        "MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT": str(IDLE_IN_TRANSACTION_S),
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture()
def store(fault_env) -> Iterator[Store]:
    """The store, connected directly (the test's own view survives a cut proxy)."""
    s = Store.open(fault_env["MARCO_DIRECT_DATABASE_URL"])
    yield s
    s.close()


@pytest.fixture()
def dispatcher(fault_env) -> CeleryDispatcher:
    return CeleryDispatcher(QueueSettings.from_env(fault_env))


@pytest.fixture()
def workers(fault_env, tmp_path) -> Iterator[Callable[..., Proc]]:
    """``start(name, **env)``: a real celery worker; every one started is stopped at the end."""
    started: list[Proc] = []

    def start(name: str = "w1", ready_timeout_s: float = 90.0, pool: str = "prefork", **extra: str) -> Proc:
        proc = start_worker({**fault_env, **extra}, tmp_path / "logs", name=name, queues="reason", pool=pool,
                            ready_timeout_s=ready_timeout_s)
        started.append(proc)
        return proc

    yield start
    for p in started:
        p.stop(timeout_s=20)


@pytest.fixture()
def scheduler(store, dispatcher) -> Iterator[Callable[..., SchedulerThread]]:
    made: list[SchedulerThread] = []

    def start(on: Store | None = None, stale_queued_s: float = 3.0) -> SchedulerThread:
        t = SchedulerThread(on or store, dispatcher, stale_queued_s)
        made.append(t)
        return t

    yield start
    for t in made:
        t.stop()
