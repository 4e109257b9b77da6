"""Queue faults handled in the store and the job runner (issue 10), on SQLite and Postgres, no worker processes:
stranded queued jobs re-sent, heartbeat leases, lease lost vs worker died, transient database errors,
cancel within a round, shutdown hand-back, oversized questions, schema upgrades under a lock."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Sequence

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from marco.jobs import BackendCache, execute_job
from marco.llm.base import Backend, Generation, GenerationRequest
from marco.llm.scripted import ScriptedBackend
from marco.search.base import SearchConfig
from marco.search.driver import LockstepDriver
from marco.search.sink import RecordingSink
from marco.store import Store, StoreError
from marco.store.heartbeat import SHUTDOWN
from marco.store.models import Job
from marco.store.rows import utcnow
from marco.tasks import get_task
from marco.tasks.base import Problem
from scheduler.progress import snapshot, table
from scheduler.service import Scheduler, SchedulerConfig

MCTS = SearchConfig(strategy="mcts", action="ministep:6", budget=600, children=2, max_rounds=12, seed=7, reflect=True)


def problems(n: int, prefix: str = "q") -> list[Problem]:
    return [Problem("mgsm", "en", i, f"{prefix} {i}: what is 40 + {i}?", ("42",)) for i in range(n)]


class Recorder:
    distributed = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def check(self) -> None:
        return None

    def enqueue(self, jobs, priority: int = 0) -> None:
        self.sent.extend(jobs)


class Hook:
    """Delegates to ``backend``; calls ``before(call_number)`` before each generate step."""

    def __init__(self, backend: Backend, before) -> None:
        self.backend, self.before, self.name, self.n = backend, before, backend.name, 0

    def _step(self) -> None:
        self.n += 1
        self.before(self.n)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        self._step()
        return self.backend.generate(requests)

    def generate_continuous(self, requests, refill) -> None:
        def hooked(done):
            self._step()
            return refill(done)

        self._step()
        return self.backend.generate_continuous(requests, hooked)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def reference(store: Store, plan, probs: list[Problem], config: SearchConfig = MCTS):
    return LockstepDriver(ScriptedBackend(), get_task("mgsm"), config, RecordingSink()).run(probs, plan.search_ids)


def assert_same_answers(store: Store, ref) -> None:
    for r in ref:
        row = store.get_search(r.search_id)
        assert row.status == "done", (row.status, row.error)
        assert (row.final_answer, row.final_node_id, row.tokens) == (r.answer, r.final_node_id, r.tokens)
        ids = [n.id for n in store.load_nodes(r.search_id)]
        assert len(ids) == len(set(ids)) == len(r.tree)


def set_job(store: Store, job_id: str, **values) -> None:
    with store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


# --- item 1: queued with no message ---------------------------------------------------------------------
def test_scheduler_resends_jobs_queued_too_long_and_status_shows_it(store: Store) -> None:
    plan = store.create_batch(problems(4), [MCTS], model="scripted", chunk_size=2)
    rec = Recorder()
    sched = Scheduler(store, rec, SchedulerConfig(stale_queued_s=60))
    assert sched.tick().resent == []  # just enqueued: not stranded
    set_job(store, plan.job_ids[0], enqueued_at=utcnow() - timedelta(seconds=120))
    set_job(store, plan.job_ids[1], enqueued_at=utcnow() - timedelta(seconds=120))
    report = sched.tick()
    assert sorted(report.resent) == sorted(plan.job_ids) and sorted(rec.sent) == sorted((j, "reason") for j in plan.job_ids)
    # a second scheduler right after finds nothing (the resend moved enqueued_at), and back-off doubles the wait
    assert Scheduler(store, rec, SchedulerConfig(stale_queued_s=60)).tick().resent == []
    set_job(store, plan.job_ids[0], enqueued_at=utcnow() - timedelta(seconds=90))
    assert sched.tick().resent == []  # 90 s < 2 * 60 s after one resend
    set_job(store, plan.job_ids[0], enqueued_at=utcnow() - timedelta(seconds=130))
    assert sched.tick().resent == [plan.job_ids[0]]
    progress = store.batch_progress(plan.batch_id)
    assert progress.resent == 3
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table([snapshot(store, plan.batch_id)]))
    assert "resent" in console.export_text()
    # a claimed (running) job is never re-sent
    store.claim_job(plan.job_ids[1], "w1")
    set_job(store, plan.job_ids[1], enqueued_at=utcnow() - timedelta(hours=1))
    assert plan.job_ids[1] not in store.resend_stranded(60)


# --- item 2: heartbeat leases; a live worker's lost lease is not a death --------------------------------
def test_heartbeat_holds_the_lease_through_a_slow_model_load_and_long_rounds(store: Store) -> None:
    probs = problems(2)
    plan = store.create_batch(probs, [MCTS], model="slow", task="mgsm", chunk_size=2)
    ref = reference(store, plan, probs)

    thieves: list[object] = []

    def slow_loader(spec: str) -> Backend:
        t.start()  # the job is claimed by now
        time.sleep(2.5)  # longer than the 1.2 s lease
        return Hook(ScriptedBackend(), lambda n: time.sleep(0.5 if n < 4 else 0))

    def thief() -> None:  # another worker tries to take the job all along
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            got = store.claim_job(plan.job_ids[0], "w2", 1.2)
            if got is not None:
                thieves.append(got)
            time.sleep(0.2)

    t = threading.Thread(target=thief)
    outcome = execute_job(store, plan.job_ids[0], BackendCache(slow_loader), "w1", lease_s=1.2)
    t.join()
    assert outcome.status == "done", outcome.error
    assert thieves == [] and store.get_job(plan.job_ids[0]).attempts == 1
    assert_same_answers(store, ref)


def test_lease_lost_by_a_live_worker_is_reported_as_such(store: Store) -> None:
    probs = problems(2)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=2)
    job = plan.job_ids[0]

    def stall(n: int) -> None:
        if n == 2:  # the database "goes away" for the heartbeat: the lease expires, another worker takes over
            set_job(store, job, lease_until=utcnow() - timedelta(seconds=1))
            requeued, _ = store.requeue_expired(max_attempts=5)
            assert requeued == [(job, "reason")]
            assert store.claim_job(job, "w2", 60) is not None

    backends = BackendCache()
    backends.put("scripted", Hook(ScriptedBackend(), stall))
    outcome = execute_job(store, job, backends, "w1", lease_s=60)
    assert outcome.status == "lost" and "lease lost while its worker w1 was alive" in (outcome.error or "")
    row = store.get_job(job)
    assert row.lease_losses == 1 and row.attempts == 2 and row.worker == "w2"
    # w2 dies: its expiry is the first death (attempts 2 - 1 lease loss), under max_attempts=2 it is requeued
    set_job(store, job, lease_until=utcnow() - timedelta(seconds=1))
    requeued, failed = store.requeue_expired(max_attempts=2)
    assert requeued == [(job, "reason")] and failed == []
    store.claim_job(job, "w3", 60)
    set_job(store, job, lease_until=utcnow() - timedelta(seconds=1))
    requeued, failed = store.requeue_expired(max_attempts=2)
    assert failed == [job]
    error = store.get_job(job).error or ""
    assert "lease expired 2 times with no renewal from its worker" in error and error.endswith("live worker: 1")


# --- item 3: transient database errors ------------------------------------------------------------------
def test_transient_database_error_is_raised_not_recorded_and_the_retry_resumes(store: Store) -> None:
    probs = problems(3)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=3)
    ref = reference(store, plan, probs)
    job = plan.job_ids[0]

    def blink(n: int) -> None:
        if n == 3:
            raise OperationalError("UPDATE nodes", {}, ConnectionError("server closed the connection unexpectedly"))

    flaky = BackendCache()
    flaky.put("scripted", Hook(ScriptedBackend(), blink))
    claims: list = []
    with pytest.raises(OperationalError):
        execute_job(store, job, flaky, "w1", lease_s=60, on_claim=claims.append)
    row = store.get_job(job)
    assert row.status == "running" and row.worker == "w1" and row.error is None  # not failed, lease kept
    # the task's retry (same worker) takes it back and resumes from the stored rounds
    assert execute_job(store, job, BackendCache(), "w2", lease_s=60).status == "skipped"
    healthy = BackendCache()
    healthy.put("scripted", ScriptedBackend())
    # a reclaim names the claim it takes back (its fencing token): never a lease held by another process
    # or thread under the same worker name
    assert execute_job(store, job, healthy, "w1", lease_s=60, reclaim=True, token=claims[0].token + 1).status == "skipped"
    outcome = execute_job(store, job, healthy, "w1", lease_s=60, reclaim=True, token=claims[0].token)
    assert outcome.status == "done", outcome.error
    assert_same_answers(store, ref)


def test_task_state_follows_the_job_end() -> None:
    from celery.exceptions import Ignore, Reject

    from worker.tasks import JobFailed, is_transient, task_result

    assert task_result({"status": "done"}) == {"status": "done"}
    with pytest.raises(JobFailed, match="boom"):
        task_result({"status": "failed", "error": "boom"})
    with pytest.raises(Reject) as cancelled:
        task_result({"status": "cancelled"})
    assert cancelled.value.requeue is False
    with pytest.raises(Reject) as released:
        task_result({"status": "released"})
    assert released.value.requeue is True
    with pytest.raises(Ignore):
        task_result({"status": "lost"})
    assert is_transient(OperationalError("x", {}, Exception("connection refused")))
    assert not is_transient(ValueError("bad input"))


# --- item 5: cancel within a round; late results never make a cancelled search done ---------------------
def test_cancel_stops_a_running_job_within_one_round(store: Store) -> None:
    probs = problems(3)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=3)
    rounds_after_cancel: list[int] = []
    cancelled_at: list[int] = []

    def step(n: int) -> None:
        if cancelled_at:
            rounds_after_cancel.append(n)
        if n == 2:
            store.cancel_batch(plan.batch_id)
            cancelled_at.append(n)

    backends = BackendCache()
    backends.put("scripted", Hook(ScriptedBackend(), step))
    outcome = execute_job(store, plan.job_ids[0], backends, "w1", lease_s=600)  # renewal far away: the round check sees it
    assert outcome.status == "cancelled"
    assert len(rounds_after_cancel) <= 1
    assert store.get_job(plan.job_ids[0]).status == "cancelled"
    assert {store.get_search(s).status for s in plan.search_ids} == {"cancelled"}
    assert store.batch_progress(plan.batch_id).status == "cancelled"


def test_late_results_do_not_turn_cancelled_searches_done(store: Store) -> None:
    probs = problems(2)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=2)
    ref = reference(store, plan, probs)
    store.cancel_batch(plan.batch_id)
    store.write_results(ref)
    store.mark_searches(plan.search_ids, "running")
    assert {store.get_search(s).status for s in plan.search_ids} == {"cancelled"}


# --- item 9: shutdown hands the job back after the round ------------------------------------------------
def test_shutdown_releases_the_job_after_its_round_and_another_worker_finishes_it(store: Store) -> None:
    probs = problems(3)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=3)
    ref = reference(store, plan, probs)
    job = plan.job_ids[0]
    backends = BackendCache()
    backends.put("scripted", Hook(ScriptedBackend(), lambda n: SHUTDOWN.set() if n == 2 else None))
    try:
        outcome = execute_job(store, job, backends, "w1", lease_s=600)
    finally:
        SHUTDOWN.clear()
    assert outcome.status == "released"
    row = store.get_job(job)
    assert row.status == "queued" and row.worker is None and row.lease_until is None
    assert sum(store.count_nodes(s) for s in plan.search_ids) > 0  # the rounds run so far are kept
    healthy = BackendCache()
    healthy.put("scripted", ScriptedBackend())
    assert execute_job(store, job, healthy, "w2", lease_s=600).status == "done"
    assert_same_answers(store, ref)


# --- item 6: a question the model cannot take fails only its own problem --------------------------------
@pytest.mark.parametrize("too_long", ["megabyte", "context"])
def test_oversized_question_fails_only_its_problem(store: Store, too_long: str) -> None:
    probs = problems(3)
    big = "x" * (1 << 20) if too_long == "megabyte" else "y" * 500
    probs[1] = Problem("mgsm", "en", 1, big, ("42",))
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=3)
    backend = ScriptedBackend()
    backend.max_context = 400
    backends = BackendCache()
    backends.put("scripted", backend)
    outcome = execute_job(store, plan.job_ids[0], backends, "w1")
    assert outcome.status == "failed"
    expected = "over the limit of 100,000" if too_long == "megabyte" else "longer than the model's context of 400"
    assert expected in (outcome.error or "") and "mgsm/en/1" in (outcome.error or "")
    rows = [store.get_search(s) for s in plan.search_ids]
    assert [r.status for r in rows] == ["done", "failed", "done"]
    assert expected in (rows[1].error or "") and store.count_nodes(rows[1].id) == 0


# --- item 7: schema upgrades --------------------------------------------------------------------------
def test_database_newer_than_the_code_is_refused(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Store.open(url).close()
    s = Store.open(url)
    with s.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    s.close()
    with pytest.raises(StoreError, match="newer than this code knows.*upgrade Marco"):
        Store.open(url)


@pytest.mark.slow
def test_many_processes_opening_a_fresh_postgres_database_upgrade_it_once(pg_database) -> None:
    from marco.store import migrate

    url = pg_database()
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            Store.open(url).close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = Store.open(url)
    assert migrate.current_revision(s.engine) == migrate.head_revision()
    with s.sessions() as session:
        assert session.scalar(select(Job.id).limit(1)) is None
    s.close()


# --- item 6: one clear error each, nothing half-written -----------------------------------------------
@pytest.mark.parametrize(
    ("model", "expect"),
    [
        ("nope", "unknown model 'nope': give smollm2"),
        ("scripted:speed=3", "unknown scripted backend option 'speed'"),
        ("/no/such/dir", "no model directory at /no/such/dir"),
        ("/no/such/model.gguf", "no GGUF file at /no/such/model.gguf"),
    ],
)
def test_unknown_model_fails_at_submit_and_writes_nothing(tmp_path, monkeypatch, model: str, expect: str) -> None:
    from typer.testing import CliRunner

    from marco.cli import app

    monkeypatch.delenv("MARCO_BROKER_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    result = CliRunner().invoke(app, ["submit", "demo", "--strategy", "greedy", "--model", model, "--db", url])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and expect in lines[0] and "nothing was submitted" in lines[0], result.stderr
    assert Store.open(url).batches() == []


def test_unreadable_data_file_is_one_clear_error(tmp_path, monkeypatch) -> None:
    # Tests run as root here, so a chmod cannot make a file unreadable: the loader raises what open() would.
    from typer.testing import CliRunner

    import scheduler.submit
    from marco.cli import app

    def unreadable(request):
        raise PermissionError(13, "Permission denied", str(tmp_path / "mgsm_en.tsv"))

    monkeypatch.setattr(scheduler.submit, "load_problems", unreadable)
    monkeypatch.delenv("MARCO_BROKER_URL", raising=False)
    url = f"sqlite:///{tmp_path / 'm.db'}"
    result = CliRunner().invoke(app, ["submit", "mgsm", "--model", "scripted", "--db", url])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "cannot read the data" in lines[0] and "Permission denied" in lines[0]
    assert "Traceback" not in result.output
