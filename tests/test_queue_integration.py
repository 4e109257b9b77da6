"""Real Redis, real Postgres, real `celery worker` subprocesses running SmolLM2 with a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from marco.search.base import SearchConfig
from marco.store import Store
from marco.store.models import Job, NodeRow, ProblemRow, Search
from marco.tasks.data import PACKAGED_DIR
from scheduler.dispatch import CeleryDispatcher
from scheduler.service import Scheduler, SchedulerConfig
from scheduler.submit import SubmitRequest, submit
from worker.harness import start_worker
from worker.settings import QueueSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 12
TINY = SearchConfig(strategy="mcts", action="ministep:16", budget=48, children=2, max_depth=3, max_answer_tokens=24, seed=1)


@pytest.fixture(scope="module")
def env(pg_database, redis_url) -> dict[str, str]:
    url = pg_database()
    Store.open(url).close()  # migrate once, before any worker starts
    return {
        "MARCO_BROKER_URL": redis_url,
        "MARCO_DATABASE_URL": url,
        "MARCO_LEASE_SECONDS": str(LEASE_S),
        "MARCO_PRELOAD_MODELS": "smollm2",
        "OMP_NUM_THREADS": "1",  # two single-threaded workers share this machine's cores
    }


@pytest.fixture(scope="module")
def store(env):
    s = Store.open(env["MARCO_DATABASE_URL"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def workers(env, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("workers")
    procs = {name: start_worker(env, log_dir, name=name) for name in ("w1", "w2")}
    yield procs
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def dispatcher(env):
    return CeleryDispatcher(QueueSettings.from_env(env))


def wait_batch(store: Store, batch_id: str, timeout_s: float, tick=None) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if tick:
            tick()
        status = store.get_batch(batch_id).status
        if status not in ("queued", "running"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} still {store.get_batch(batch_id).status} after {timeout_s}s: {store.batch_progress(batch_id).to_dict()}")


def assert_trees_complete(store: Store, batch_id: str) -> None:
    """Every search ended with its chosen path stored, and no tree position holds two nodes."""
    with store.sessions() as s:
        searches = s.scalars(select(Search).where(Search.batch_id == batch_id)).all()
        for row in searches:
            if row.status == "failed":
                continue
            nodes = s.execute(select(NodeRow.id, NodeRow.parent_id, NodeRow.sibling_index).where(NodeRow.search_id == row.id)).all()
            ids = {str(n.id) for n in nodes}
            assert nodes, f"search {row.id} has no stored node"
            positions = Counter((str(n.parent_id), n.sibling_index) for n in nodes)
            assert max(positions.values()) == 1, f"duplicate node in search {row.id}"
            assert all(n.parent_id is None or str(n.parent_id) in ids for n in nodes)
            assert row.final_node_id is None or str(row.final_node_id) in ids
            assert set(row.chosen_path) <= ids


def test_mgsm_two_languages_over_two_workers(store, workers, dispatcher, env) -> None:
    # No data_dir: the problems come from the MGSM shipped with marco and travel with the batch in the store.
    request = SubmitRequest(task="mgsm", configs=[TINY], model="smollm2", langs=["en", "zh"], limit=2, chunk=1)
    plan = submit(store, dispatcher, request)
    assert len(plan.job_ids) == 4
    assert wait_batch(store, plan.batch_id, 240) == "done"
    with store.sessions() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == plan.batch_id)).all()
        searches = s.scalars(select(Search).where(Search.batch_id == plan.batch_id)).all()
    assert {j.status for j in jobs} == {"done"}
    assert {j.worker.split("@")[0] for j in jobs} == {"w1", "w2"}, "both workers should have taken jobs"
    assert {s.status for s in searches} == {"done"} and {s.lang for s in searches} == {"en", "zh"}
    assert all(s.tokens > 0 for s in searches)
    assert_trees_complete(store, plan.batch_id)

    out = subprocess.run(
        [sys.executable, "-c", "from marco.cli import main; main()", "report", plan.batch_id, "--json"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (row,) = report["rows"]
    assert row["problems"] == 4
    for lang in ("en", "zh"):
        stored = [s.correct for s in searches if s.lang == lang]
        expected = sum(bool(c) for c in stored) / len(stored)
        assert row["cells"][lang] in (pytest.approx(expected), pytest.approx(100 * expected))


def test_malformed_row_fails_with_its_reason_and_the_rest_completes(store, workers, dispatcher, tmp_path) -> None:
    good = (PACKAGED_DIR / "mgsm" / "mgsm_en.tsv").read_text(encoding="utf-8").splitlines()[:2]
    (tmp_path / "mgsm_en.tsv").write_text("\n".join([good[0], "How many apples?\tseven", good[1]]) + "\n", encoding="utf-8")
    request = SubmitRequest(task="mgsm", configs=[TINY], model="smollm2", data_dir=str(tmp_path), langs=["en"], chunk=1)
    plan = submit(store, dispatcher, request)
    assert wait_batch(store, plan.batch_id, 180) in ("done", "failed")
    with store.sessions() as s:
        rows = s.execute(
            select(ProblemRow.index, ProblemRow.error, Search.status, Search.error, Job.status, Job.error)
            .join(Search, Search.problem_id == ProblemRow.id).join(Job, Job.id == Search.job_id)
            .where(ProblemRow.batch_id == plan.batch_id).order_by(ProblemRow.index)
        ).all()
    bad = rows[1]
    assert "is not a number" in bad[1]
    assert bad[2] == "failed" and "is not a number" in bad[3]
    assert bad[4] == "failed" and "is not a number" in bad[5]  # its job fails with the row's reason
    assert [r[2] for r in (rows[0], rows[2])] == ["done", "done"]
    assert [r[4] for r in (rows[0], rows[2])] == ["done", "done"]


def test_sigkilled_worker_job_is_resumed_once_by_another(store, workers, dispatcher, env, tmp_path) -> None:
    config = SearchConfig(strategy="mcts", action="ministep:8", budget=160, children=2, max_depth=4, max_answer_tokens=24, seed=2)
    request = SubmitRequest(task="mgsm", configs=[config], model="smollm2", langs=["en"], limit=1, chunk=1)
    plan = submit(store, dispatcher, request)
    (job_id,) = plan.job_ids
    (search_id,) = plan.search_ids

    # Wait until a worker holds the job and has written part of its tree, then kill that worker outright.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if job.status == "running" and store.count_nodes(search_id) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"job never started: {store.get_job(job_id).status}")
    victim_name = job.worker.split("@")[0]
    victim = workers[victim_name]
    nodes_before = store.count_nodes(search_id)
    victim.kill()
    victim.popen.wait(10)
    assert store.get_job(job_id).status == "running"  # nobody told the store: only the lease can

    scheduler = Scheduler(store, dispatcher, SchedulerConfig(max_attempts=5))
    assert wait_batch(store, plan.batch_id, 200, tick=scheduler.tick) == "done"
    job = store.get_job(job_id)
    assert job.attempts == 2 and job.status == "done"
    assert not job.worker.startswith(victim_name + "@")
    assert store.count_nodes(search_id) >= nodes_before
    assert_trees_complete(store, plan.batch_id)
    with store.sessions() as s:
        n_answers = s.scalar(select(func.count()).select_from(Search).where(Search.id == search_id, Search.final_answer.is_not(None)))
    assert n_answers <= 1
    workers[victim_name] = start_worker(env, tmp_path, name=victim_name)  # for any later test
