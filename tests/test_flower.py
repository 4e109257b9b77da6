"""A real Flower (basic auth on) watching a real worker run a batch, read through Flower's HTTP API."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from marco.search.base import SearchConfig
from marco.store import Store
from marco.tasks.base import Problem
from scheduler.dispatch import CeleryDispatcher
from scheduler.submit import SubmitRequest, submit
from worker.harness import start_flower, start_worker
from worker.settings import QueueSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
AUTH = ("ops", "s3cret-pass")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flower_shows_the_worker_and_the_batch_tasks(pg_database, redis_url, tmp_path) -> None:
    db = pg_database()
    store = Store.open(db)
    env = {"MARCO_BROKER_URL": redis_url, "MARCO_DATABASE_URL": db}
    port = free_port()
    flower = start_flower(env, tmp_path, port, f"{AUTH[0]}:{AUTH[1]}")
    worker = start_worker(env, tmp_path, name="flowerw", queues="reason")
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(AUTH[0], "wrong"), timeout=10).status_code == 401

        problems = [Problem("demo", "en", i, f"flower {i}: 40 + 2?", ("42",)) for i in range(3)]
        request = SubmitRequest(task="demo", configs=[SearchConfig(strategy="greedy", budget=64)], model="scripted", chunk=1)
        plan = submit(store, CeleryDispatcher(QueueSettings.from_env(env)), request, problems)

        deadline = time.monotonic() + 90
        tasks: dict = {}
        while time.monotonic() < deadline:
            tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=10).json()
            ours = [t for t in tasks.values() if t.get("args") and any(j in t["args"] for j in plan.job_ids)]
            if len(ours) == 3 and all(t["state"] == "SUCCESS" for t in ours):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Flower never saw the 3 tasks succeed: {tasks}")
        assert {t["name"] for t in ours} == {"marco.reason"}
        assert all(t["worker"].startswith("flowerw@") for t in ours)
        assert store.batch_progress(plan.batch_id).status == "done"

        workers = httpx.get(f"{base}/api/workers", auth=AUTH, params={"refresh": "true"}, timeout=30).json()
        (name,) = [w for w in workers if w.startswith("flowerw@")]
        queues = {q["name"] for q in workers[name]["active_queues"]}
        assert queues == {"reason"}
    finally:
        worker.stop()
        flower.stop()
        store.close()
