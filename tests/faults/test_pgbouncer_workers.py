"""A batch through PgBouncer in transaction mode: two real `celery worker` processes and the scheduler reach
Postgres only through a private pgbouncer (``?pgbouncer=1``) with fewer server connections than clients;
migrations ran directly first (fault_env). Every job ends done, every search holds exactly the nodes of an
undisturbed run (none twice), both workers took jobs, and PgBouncer never lent more than its pool."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from fault_kit import assert_batch_sound, submit, wait_ended
from marco.store import Store
from marco.store.models import Job

POOL = 3  # server connections PgBouncer may open: fewer than the clients (2 workers x 2, the scheduler, the test)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_batch_through_pgbouncer_with_two_workers(store, dispatcher, fault_env, workers, scheduler, pgbouncer) -> None:
    bouncer = pgbouncer(pool_size=POOL)
    through = bouncer.url(fault_env["MARCO_DIRECT_DATABASE_URL"])
    pooled = Store.open(through)  # schema current (migrated directly): opens without migrating
    db = fault_env["MARCO_DIRECT_DATABASE_URL"].rsplit("/", 1)[1]
    seen = {"clients": 0, "servers": 0}
    stop = threading.Event()

    def watch() -> None:  # PgBouncer's own view of the pool, sampled while the batch runs
        while not stop.wait(0.2):
            for pool in bouncer.show("POOLS"):
                if pool.get("database") == db:
                    clients = int(pool.get("cl_active", 0)) + int(pool.get("cl_waiting", 0))
                    servers = sum(int(pool.get(k, 0)) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login"))
                    seen["clients"] = max(seen["clients"], clients)
                    seen["servers"] = max(seen["servers"], servers)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once (each takes seconds to import and connect)
            procs = list(pool.map(lambda n: workers(n, pool="solo", MARCO_DATABASE_URL=through), ("w1", "w2")))
        scheduler(on=pooled)
        batch = submit(pooled, dispatcher, n=16, chunk=2, model="scripted:round=0.2")
        assert wait_ended(store, batch.batch_id, 120) == "done", store.batch_progress(batch.batch_id).to_dict()
    finally:
        stop.set()
        watcher.join(5)
        pooled.close()
    assert_batch_sound(store, batch)  # every job done; each search's node ids = an undisturbed run's, none twice
    with store.sessions() as s:
        runners = {j.worker for j in s.scalars(select(Job).where(Job.batch_id == batch.batch_id))}
    assert len(runners) >= 2, runners  # both workers ran jobs
    assert seen["servers"] <= POOL and seen["clients"] > POOL, seen  # multiplexed, never past the pool
    for text in [p.output() for p in procs] + [bouncer.log()]:
        assert "prepared statement" not in text and "unsupported startup parameter" not in text
        assert "MigrateDirectly" not in text
