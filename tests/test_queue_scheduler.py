"""Submit, lease watching, batch completion and stage hooks against the real store (no workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from marco.search.base import SearchConfig
from marco.store import Store
from marco.store.models import Batch, Job
from marco.tasks.base import Problem
from scheduler import stages
from scheduler.dispatch import BrokerUnavailable, CeleryDispatcher, InlineDispatcher
from scheduler.service import Scheduler, SchedulerConfig
from scheduler.submit import SubmitRequest, submit
from worker.settings import QueueSettings

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SearchConfig(strategy="greedy", budget=64)


def problems(n: int, prefix: str = "q") -> list[Problem]:
    return [Problem("demo", "en", i, f"{prefix} {i}: what is 40 + 2?", ("42",)) for i in range(n)]


class Recorder:
    """A dispatcher that records what it was asked to send (and can be told to fail)."""

    distributed = True

    def __init__(self, fail_enqueue: bool = False) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail_enqueue = fail_enqueue

    def check(self) -> None:
        return None

    def enqueue(self, jobs, priority: int = 0) -> None:
        if self.fail_enqueue:
            raise BrokerUnavailable("broker went away mid-enqueue")
        self.sent.extend(jobs)


def count_batches(store: Store) -> int:
    with store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Batch)))


@pytest.fixture()
def pg_store(pg_url):
    s = Store.open(pg_url)
    yield s
    s.close()


def test_enqueue_failure_leaves_no_half_written_batch(pg_store: Store) -> None:
    before = count_batches(pg_store)
    with pytest.raises(BrokerUnavailable):
        submit(pg_store, Recorder(fail_enqueue=True), SubmitRequest(task="demo", configs=[GREEDY], model="scripted"), problems(5))
    assert count_batches(pg_store) == before
    with pg_store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.batch_id.not_in(select(Batch.id)))) == 0


def test_broker_down_at_submit_is_one_clear_line_and_writes_nothing(pg_url: str, pg_store: Store) -> None:
    before = count_batches(pg_store)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MARCO_BROKER_URL": "redis://127.0.0.1:1/0", "MARCO_DATABASE_URL": pg_url}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", "from marco.cli import main; main()", "submit", "demo", "--model", "scripted", "--strategy", "greedy"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert out.returncode == 1
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "does not answer" in lines[0] and "MARCO_BROKER_URL" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 30
    assert count_batches(pg_store) == before


def test_celery_dispatcher_check_fails_fast_on_a_dead_broker() -> None:
    with pytest.raises(BrokerUnavailable, match="127.0.0.1:1"):
        CeleryDispatcher(QueueSettings(broker_url="redis://127.0.0.1:1/0")).check()


def test_expired_leases_are_requeued_once_then_fail_after_max_attempts(pg_store: Store) -> None:
    rec = Recorder()
    plan = submit(pg_store, rec, SubmitRequest(task="demo", configs=[GREEDY], model="scripted", chunk=2), problems(4, "lease"))
    first, second = plan.job_ids
    assert rec.sent == [(first, "reason"), (second, "reason")]
    assert pg_store.claim_job(first, "dead-worker", lease_s=0.05) is not None
    assert pg_store.claim_job(second, "live-worker", lease_s=600) is not None
    time.sleep(0.2)
    sched = Scheduler(pg_store, rec, SchedulerConfig(max_attempts=2))
    report = sched.tick()
    assert report.requeued == [first] and rec.sent[-1] == (first, "reason")
    assert pg_store.get_job(first).status == "queued" and pg_store.get_job(second).status == "running"
    assert sched.tick().requeued == []  # queued now: not sent again

    assert pg_store.claim_job(first, "dead-again", lease_s=0.05).attempts == 2
    time.sleep(0.2)
    report = sched.tick()
    assert report.failed == [first] and report.requeued == []
    job = pg_store.get_job(first)
    assert job.status == "failed" and "lease expired 2 times" in job.error


def test_stage_handlers_run_once_per_ended_batch(pg_store: Store) -> None:
    calls: list[str] = []

    def next_stage(store, batch):  # noqa: ANN001
        calls.append(str(batch.id))
        return [("00000000-0000-0000-0000-000000000000", "synthesize")]

    stages.stage("reason")(next_stage)
    try:
        rec = Recorder()
        plan = submit(pg_store, rec, SubmitRequest(task="demo", configs=[GREEDY], model="scripted", chunk=5), problems(3, "stage"))
        sched = Scheduler(pg_store, rec, SchedulerConfig())
        sched.tick()
        assert plan.batch_id not in calls  # still queued
        (job_id,) = plan.job_ids
        pg_store.claim_job(job_id, "w", 60)
        pg_store.finish_job(job_id, "w")
        report = sched.tick()
        assert calls.count(plan.batch_id) == 1 and plan.batch_id in report.closed_batches
        assert ("00000000-0000-0000-0000-000000000000", "synthesize") in rec.sent
        sched.tick()
        assert calls.count(plan.batch_id) == 1
    finally:
        stages.unregister("reason", next_stage)


def test_scheduler_closes_batches_whose_jobs_all_ended(pg_store: Store) -> None:
    plan = submit(pg_store, Recorder(), SubmitRequest(task="demo", configs=[GREEDY], model="scripted", chunk=1), problems(2, "close"))
    with pg_store.sessions.begin() as s:  # jobs ended behind the batch's back (e.g. an operator's SQL)
        s.execute(update(Job).where(Job.batch_id == plan.batch_id).values(status="done"))
    assert pg_store.get_batch(plan.batch_id).status == "queued"
    Scheduler(pg_store, Recorder()).tick()
    assert pg_store.get_batch(plan.batch_id).status == "done"


def test_without_a_broker_jobs_run_in_process(tmp_path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'm.db'}")
    plan = submit(store, InlineDispatcher(QueueSettings(), store=store),
                  SubmitRequest(task="demo", configs=[GREEDY], model="scripted", chunk=2), problems(4, "inline"))
    progress = store.batch_progress(plan.batch_id)
    assert progress.status == "done" and progress.jobs == {"done": 2}
    assert progress.searches == {"done": 4} and progress.tokens > 0
    store.close()


@pytest.mark.slow
def test_ten_thousand_problems_are_planned_and_enqueued_in_seconds(pg_store: Store, redis_url: str) -> None:
    import redis

    dispatcher = CeleryDispatcher(QueueSettings(broker_url=redis_url))
    t0 = time.perf_counter()
    plan = submit(pg_store, dispatcher, SubmitRequest(task="demo", configs=[GREEDY], model="scripted", chunk=4), problems(10_000, "bulk"))
    elapsed = time.perf_counter() - t0
    client = redis.Redis.from_url(redis_url)
    queued = sum(client.llen(k) for k in client.scan_iter("reason*"))
    for key in client.scan_iter("reason*"):  # leave the queue empty for the worker tests
        client.delete(key)
    pg_store.cancel_batch(plan.batch_id)
    assert len(plan.job_ids) == 2500 and queued >= 2500
    assert elapsed < 20, f"planning + enqueueing 10,000 problems took {elapsed:.1f}s"


# --- an unknown checkpoint or model directory is one line and exit 1, before anything is written or loaded
def test_submit_with_an_unknown_checkpoint_writes_nothing(pg_store: Store) -> None:
    from marco.store import StoreError

    before, recorder = count_batches(pg_store), Recorder()
    request = SubmitRequest(task="demo", configs=[GREEDY], model="checkpoint:abcdef")
    with pytest.raises(StoreError, match="no checkpoint 'abcdef'"):
        submit(pg_store, recorder, request, problems(3, "ckpt"))
    assert count_batches(pg_store) == before and recorder.sent == []


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load weights fails the test: these errors must come before a model loads."""
    from marco.llm import hf

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(hf.HFBackend, "load", classmethod(refuse))
    monkeypatch.delenv("MARCO_BROKER_URL", raising=False)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["submit", "demo", "--strategy", "greedy", "--model", "checkpoint:abcdef"], "no checkpoint 'abcdef'"),
        (["solve", "1 + 1?", "--strategy", "greedy", "--model", "checkpoint:nope"], "no checkpoint 'nope'"),
        (["run", "--strategy", "greedy", "--model", "checkpoint:nope"], "no checkpoint 'nope'"),
        (["run", "--strategy", "greedy", "--model", "/no/such/dir"], "no model directory at /no/such/dir"),
    ],
)
def test_cli_bad_model_is_one_line_and_exit_1(
    args: list[str], expect: str, pg_url: str, pg_store: Store, no_model_load: None
) -> None:
    from typer.testing import CliRunner

    from marco.cli import app

    before = count_batches(pg_store)
    result = CliRunner().invoke(app, [*args, "--db", pg_url])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert count_batches(pg_store) == before
