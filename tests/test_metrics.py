"""Prometheus metrics (issue 18): served by a real worker and a real scheduler process, scraped over HTTP
while a real batch runs; the dashboard references only metrics that exist."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from marco import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "marco.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout_s: float = 30.0) -> dict[str, float]:
    """``{'name{label="v",...}': value}`` from ``/metrics`` (retried until the server answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_port_comes_from_the_environment_and_bad_values_are_named() -> None:
    assert metrics.port_from_env(env={}) is None
    assert metrics.port_from_env(env={"MARCO_METRICS_PORT": ""}) is None
    assert metrics.port_from_env(2, env={"MARCO_METRICS_PORT": "9100"}) == 9102
    with pytest.raises(ValueError, match="MARCO_METRICS_PORT"):
        metrics.port_from_env(env={"MARCO_METRICS_PORT": "nine"})
    with pytest.raises(ValueError, match="not a port"):
        metrics.port_from_env(env={"MARCO_METRICS_PORT": "70000"})


def test_every_metric_is_named_marco() -> None:
    assert metrics.EXPORTED and all(name.startswith("marco_") for name in metrics.EXPORTED)


def _dashboard_metric_names(doc: dict) -> set[str]:
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\b(marco_[a-z_]+)", e)}


def _base(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_created"):
        if name.endswith(suffix) and name[: -len(suffix)] in metrics.EXPORTED:
            return name[: -len(suffix)]
    return name


def test_dashboard_parses_and_references_only_exported_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] and doc["panels"] and doc.get("schemaVersion")
    names = _dashboard_metric_names(doc)
    unknown = {n for n in names if _base(n) not in metrics.EXPORTED}
    assert not unknown, f"the dashboard queries metrics nobody exports: {sorted(unknown)}"
    # the headline metrics of the issue all have a panel
    for wanted in ("marco_tokens_generated_total", "marco_nodes_written_total", "marco_queue_depth",
                   "marco_queue_oldest_age_seconds", "marco_leases_lost_total", "marco_resends_total"):
        assert wanted in names, wanted
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_prometheus_scrape_config_points_at_the_metrics_ports() -> None:
    import yaml

    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert {"marco-scheduler", "marco-worker"} <= set(jobs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_change_as_a_real_batch_runs_through_a_real_worker(pg_database, redis_url, tmp_path) -> None:
    from marco.search.base import SearchConfig
    from marco.store import Store
    from scheduler.dispatch import CeleryDispatcher
    from scheduler.submit import SubmitRequest, submit
    from worker.harness import _start, start_worker
    from worker.settings import QueueSettings

    url = pg_database()
    Store.open(url).close()
    scheduler_port = _free_port()
    worker_port = _free_port()
    # the check below needs the port above the worker's free: not the scheduler's, not anyone else's
    while worker_port + 1 == scheduler_port or not refused(worker_port + 1):
        worker_port = _free_port()
    env = {"MARCO_BROKER_URL": redis_url, "MARCO_DATABASE_URL": url, "MARCO_LEASE_SECONDS": "3", "OMP_NUM_THREADS": "1"}
    store = Store.open(url)
    sched = _start([sys.executable, "-m", "marco", "scheduler", "--interval", "0.5"],
                   {**env, "MARCO_METRICS_PORT": str(scheduler_port)}, tmp_path / "scheduler.log", "scheduler")
    worker = None
    try:
        # 1. jobs queued, nobody consuming: the scheduler's gauges say how many and how old
        config = SearchConfig(strategy="mcts", action="ministep:16", budget=192, children=2, max_depth=4, seed=1)
        request = SubmitRequest(task="demo", configs=[config], model="scripted:round=1.5", chunk=4)
        plan = submit(store, CeleryDispatcher(QueueSettings.from_env(env)), request)
        n_jobs, n_problems = len(plan.job_ids), len(plan.problem_ids)
        deadline = time.monotonic() + 60
        while scrape(scheduler_port).get('marco_queue_depth{queue="reason"}') != n_jobs:
            assert time.monotonic() < deadline, sched.output()[-2000:]
            time.sleep(0.3)
        before = scrape(scheduler_port)
        assert before["marco_scheduler_tick_seconds_count"] >= 1
        assert before['marco_queue_oldest_age_seconds{queue="reason"}'] > 0
        assert before['marco_jobs_running{queue="reason"}'] == 0

        # 2. a worker serves its own metrics (prefork: pool process 0 on the base port), zero before any job
        worker = start_worker({**env, "MARCO_METRICS_PORT": str(worker_port)}, tmp_path, name="m1", queues="reason")
        first = scrape(worker_port)
        assert refused(worker_port + 1), "one pool process, one port"
        deadline = time.monotonic() + 180
        while store.get_batch(plan.batch_id).status in ("queued", "running"):
            assert time.monotonic() < deadline, worker.output()[-3000:]
            time.sleep(0.3)
        assert store.get_batch(plan.batch_id).status == "done"
        after = scrape(worker_port)
        grew = {k: after.get(k, 0) - first.get(k, 0) for k in after}
        assert grew['marco_jobs_total{kind="reason",status="done"}'] == n_jobs
        assert grew['marco_searches_total{status="done"}'] == n_problems
        assert grew['marco_problems_total{status="done"}'] == n_problems
        assert grew["marco_claim_seconds_count"] == n_jobs
        with store.sessions() as s:
            from sqlalchemy import func, select

            from marco.store.models import NodeRow, Search

            nodes = s.scalar(select(func.count()).select_from(NodeRow).join(Search).where(Search.batch_id == plan.batch_id))
            tokens = s.scalar(select(func.sum(Search.tokens)).where(Search.batch_id == plan.batch_id))
        assert grew["marco_nodes_written_total"] == nodes > 0
        assert grew["marco_tokens_generated_total"] == tokens > 0
        assert grew["marco_store_write_seconds_count"] > 0
        assert after['marco_model_load_seconds{model="scripted:round=1.5"}'] > 0
        assert grew["marco_lease_renewals_total"] >= 1, {k: v for k, v in after.items() if "job_seconds" in k}  # lease 3 s, renewed every 1 s
        assert after["marco_leases_lost_total"] == 0

        # 3. the scheduler saw the queue drain
        deadline = time.monotonic() + 30
        while scrape(scheduler_port).get('marco_queue_depth{queue="reason"}') != 0:
            assert time.monotonic() < deadline
            time.sleep(0.3)

        # 4. `marco status` shows the same headline numbers
        out = subprocess.run([sys.executable, "-m", "marco", "status", "--json", "--fleet"], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert out.returncode == 0, out.stderr
        fleet = json.loads(out.stdout)["fleet"]
        assert fleet["queues"]["reason"] == {"queued": 0, "running": 0, "oldest_age_s": 0.0}
    finally:
        if worker is not None:
            worker.stop()
        sched.stop()
        store.close()
