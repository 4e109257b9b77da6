"""Exactly once (issue 17): each numbered point of the issue, reproduced on real Postgres (and real Redis and
`celery worker` processes where the point involves them). Every test here failed on the code before the
fix (see the issue's report for the run against the old code).

1. a backlog of 70,001 queued jobs does not stop the scheduler, and is not mistaken for lost messages;
2. releases and lease losses are not deaths;
3. a worker that lost its lease cannot commit (a round, its results, a long job's rows);
4. a worker's identity is unique per run, and a reclaim never takes another live claim's lease;
5. a job with no progress is ended, on every pool;
6. Postgres session limits are set by the product;
7. a heartbeat after the job's own end is no lease loss; a claim resets `resends`; priority survives a re-send.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import pytest
import redis
from fault_kit import LEASE_S, MCTS, problems, submit, wait_ended
from sqlalchemy import event, func, select, text, update

from marco.jobs import BackendCache, execute_job
from marco.llm.scripted import ScriptedBackend
from marco.search.base import SearchConfig
from marco.store import Store
from marco.store.heartbeat import SHUTDOWN, Heartbeat
from marco.store.models import Batch, Job, NodeRow, Search
from marco.store.rows import utcnow
from scheduler.service import Scheduler, SchedulerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LONG = SearchConfig(strategy="mcts", action="ministep:6", budget=4000, children=2, max_rounds=30, seed=3)


def set_job(store: Store, job_id: str, **values) -> None:
    with store.sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def take_over(store: Store, job_id: str, worker: str = "w2") -> None:
    """What the scheduler and a second worker do once a lease has run out: requeue it, claim it."""
    set_job(store, job_id, lease_until=utcnow() - timedelta(seconds=1))
    store.requeue_expired(max_attempts=50)
    assert store.claim_job(job_id, worker, 60) is not None


def nodes_of(store: Store, search_ids) -> int:
    with store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(NodeRow).where(NodeRow.search_id.in_(list(search_ids)))))


class Hook:
    """A scripted backend that calls ``before(n)`` before its n-th generate call."""

    def __init__(self, before) -> None:
        self.backend, self.before, self.n = ScriptedBackend(), before, 0
        self.name = self.backend.name

    def generate(self, requests):
        self.n += 1
        self.before(self.n)
        return self.backend.generate(requests)

    def generate_continuous(self, requests, refill):
        def hooked(done):
            self.n += 1
            self.before(self.n)
            return refill(done)

        self.n += 1
        self.before(self.n)
        return self.backend.generate_continuous(requests, hooked)

    def __getattr__(self, name):
        return getattr(self.backend, name)


def hooked(before) -> BackendCache:
    cache = BackendCache()
    cache.put("scripted", Hook(before))
    return cache


# --- 1. a backlog never stops the scheduler ---------------------------------------------------------------
def test_a_backlog_of_70001_queued_jobs_neither_stops_recovery_nor_looks_lost(store, dispatcher, fault_env) -> None:
    plan = store.create_batch(problems(2), [MCTS], model="scripted", task="mgsm", chunk_size=1, priority=7)
    expired, template = plan.job_ids
    assert store.claim_job(expired, "dead-worker", lease_s=0.05) is not None
    with store.engine.begin() as conn:  # 70,001 queued jobs whose message went out an hour ago
        conn.execute(
            text(
                "INSERT INTO jobs (id, batch_id, seq, kind, payload, status, attempts, enqueued_at, resends, lease_losses) "
                "SELECT (md5(random()::text || g::text))::uuid, batch_id, seq + g, kind, payload, 'queued', 0, "
                "now() - interval '1 hour', 0, 0 FROM jobs, generate_series(1, 70001) AS g WHERE id = :t"
            ),
            {"t": template},
        )
        conn.execute(text("UPDATE jobs SET enqueued_at = now() - interval '1 hour' WHERE id = :t"), {"t": template})
    broker = redis.Redis.from_url(fault_env["MARCO_BROKER_URL"])
    pipe = broker.pipeline(transaction=False)
    for start in range(0, 70_002, 5000):  # the broker holds a message for each: a long queue, not a lost one
        pipe.lpush("reason", *[b"waiting"] * min(5000, 70_002 - start))
    pipe.execute()
    time.sleep(0.1)
    sched = Scheduler(store, dispatcher, SchedulerConfig(stale_queued_s=300, max_attempts=5, max_resend_per_tick=500))
    report = sched.tick()
    assert report.requeued == [expired], report
    assert report.resent == [], "a backlog the broker still holds was re-sent"
    assert store.get_job(expired).status == "queued"
    # the broker is flushed: now the loss is real, and the oldest jobs are re-sent, in bounded steps, with
    # their batch's priority (7 -> Celery priority 2)
    broker.flushdb()
    set_job(store, expired, enqueued_at=utcnow() - timedelta(hours=2))
    report = sched.tick()
    assert len(report.resent) == 500 and expired in report.resent, len(report.resent)
    message = next(json.loads(m) for key in broker.keys("reason*") for m in broker.lrange(key, 0, 0))
    assert message["properties"]["priority"] == 2, message["properties"]
    # a claim starts its re-send back-off afresh (the total stays for `marco status`)
    assert store.claim_job(expired, "w1", 60) is not None
    row = store.get_job(expired)
    assert row.resend_step == 0 and row.resends == 1, (row.resend_step, row.resends)


def test_a_killed_workers_leftover_message_does_not_hide_a_lost_one(store, dispatcher, fault_env) -> None:
    """A worker killed with SIGKILL leaves its delivered message in Redis' ``unacked`` hash for the visibility
    timeout (hours), after its job was requeued and done; counted as in flight, such leftovers hid as many
    lost messages as there had been kills; and a message handed to a worker killed before it claimed the job
    sat there with its job queued forever (the soak stalled with 16 such jobs)."""
    plan = store.create_batch(problems(4), [MCTS], model="scripted", task="mgsm", chunk_size=1)
    done, delivered, lost, orphan = plan.job_ids
    dispatcher.enqueue([(j, "reason") for j in plan.job_ids])
    broker = redis.Redis.from_url(fault_env["MARCO_BROKER_URL"])
    messages = {}
    for key in broker.keys("reason*"):
        for raw in broker.lrange(key, 0, -1):
            payload = json.loads(raw)
            messages[payload["headers"]["argsrepr"].strip("()[],'")] = (key, raw, payload)
    assert set(messages) == set(plan.job_ids), messages.keys()
    # delivered to a worker: moved to `unacked` (and its delivery time to `unacked_index`) as kombu does;
    # `orphan` was handed to a worker killed before it could claim it, 10 minutes ago
    for tag, (job, ago_s) in enumerate(((done, 5.0), (delivered, 5.0), (orphan, 600.0))):
        key, raw, payload = messages[job]
        broker.lrem(key, 1, raw)
        broker.hset("unacked", f"tag-{tag}", json.dumps([payload, "reason", "reason"]))
        broker.zadd("unacked_index", {f"tag-{tag}": time.time() - ago_s})
    key, raw, _ = messages[lost]
    broker.lrem(key, 1, raw)  # lost with a flush
    set_job(store, done, status="done")  # its worker was killed; a second worker ran it to the end
    for age_h, job in enumerate((orphan, lost, delivered, done), start=1):  # oldest first would pick `delivered`
        set_job(store, job, enqueued_at=utcnow() - timedelta(hours=age_h))
    sched = Scheduler(store, dispatcher, SchedulerConfig(stale_queued_s=60))
    report = sched.tick()
    # the still-queued, just delivered job is covered by its unacked message; the leftover of the done one
    # and the orphan's ten-minute-old delivery are not
    assert sorted(report.resent) == sorted([lost, orphan]), report
    assert sched.tick().resent == [], "the lost job's message is back: nothing else is missing"
    # the LIMIT of a re-send holds on Postgres (an `IN (subquery … SKIP LOCKED)` once updated every stale row)
    for job in (delivered, lost):
        set_job(store, job, status="queued", enqueued_at=utcnow() - timedelta(hours=1), resend_step=0)
    assert len(store.resend_stranded(60, limits={"reason": 1})) == 1


def test_a_failing_phase_does_not_stop_the_others(store) -> None:
    plan = store.create_batch(problems(1), [MCTS], model="scripted", task="mgsm", chunk_size=1)
    (job,) = plan.job_ids
    assert store.claim_job(job, "dead-worker", lease_s=0.05) is not None
    time.sleep(0.1)

    class BrokenStore:  # re-sending raises (as 65,536 ids did); requeueing must still happen
        def __getattr__(self, name):
            return getattr(store, name)

        def resend_stranded(self, *a, **k):
            raise RuntimeError("number of parameters must be between 0 and 65535")

    sent: list = []

    class Rec:
        distributed = True

        def enqueue(self, jobs, priority=0):
            sent.extend(jobs)

    report = Scheduler(BrokenStore(), Rec(), SchedulerConfig()).tick()
    assert report.requeued == [job] and sent == [(job, "reason")]


# --- 2. releases and lease losses are not deaths ----------------------------------------------------------
def test_warm_shutdown_releases_are_not_deaths(store) -> None:
    plan = store.create_batch(problems(2), [LONG], model="scripted", task="mgsm", chunk_size=2)
    (job,) = plan.job_ids
    SHUTDOWN.set()  # four rolling restarts: each worker hands the job back after one round
    try:
        for n in range(4):
            outcome = execute_job(store, job, hooked(lambda _: None), f"w{n}", lease_s=60)
            assert outcome.status == "released", outcome
    finally:
        SHUTDOWN.clear()
    assert store.claim_job(job, "oom-killed", lease_s=0.05) is not None  # ... and one real death
    time.sleep(0.1)
    requeued, failed = store.requeue_expired(max_attempts=5)
    assert failed == [] and requeued == [(job, "reason")], "four releases and one death failed the job"
    for n in range(4):  # four more deaths: five in all, now it fails, and says what happened
        store.claim_job(job, f"oom-{n}", lease_s=0.05)
        time.sleep(0.1)
        requeued, failed = store.requeue_expired(max_attempts=5)
    assert failed == [job]
    error = store.get_job(job).error
    assert "lease expired 5 times" in error and "shutdown, model server down): 4" in error, error


# --- 3. a worker that lost its lease never commits --------------------------------------------------------
def test_a_round_cannot_commit_after_another_worker_claimed_the_job(store) -> None:
    probs = problems(2)
    plan = store.create_batch(probs, [MCTS], model="scripted", task="mgsm", chunk_size=2)
    (job,) = plan.job_ids
    seen: dict[str, object] = {}
    rounds = {"n": 0}

    def thief() -> None:
        try:
            take_over(store, job)
            seen["claimed_at"] = time.monotonic()
            seen["nodes_at_claim"] = nodes_of(store, plan.search_ids)
        except Exception as exc:  # noqa: BLE001
            seen["error"] = exc

    def before_commit(session) -> None:  # between the round's lease check and its commit
        rounds["n"] += 1
        if rounds["n"] == 3 and "thread" not in seen:
            t = threading.Thread(target=thief)
            seen["thread"] = t
            t.start()
            t.join(1.5)  # the old code let the takeover commit here; a fenced round holds it off

    def after_commit(session) -> None:
        if "thread" in seen and "committed_at" not in seen:
            seen["committed_at"] = time.monotonic()

    event.listen(store.sessions, "before_commit", before_commit)
    event.listen(store.sessions, "after_commit", after_commit)
    try:
        outcome = execute_job(store, job, hooked(lambda _: None), "w1", lease_s=60)
    finally:
        event.remove(store.sessions, "before_commit", before_commit)
        event.remove(store.sessions, "after_commit", after_commit)
    seen["thread"].join(30)
    assert "error" not in seen, seen.get("error")
    assert outcome.status == "lost", outcome
    if seen["claimed_at"] < seen["committed_at"]:  # the new claim committed first: the old round must not
        assert nodes_of(store, plan.search_ids) == seen["nodes_at_claim"], "the old worker's round committed after the new claim"
    assert nodes_of(store, plan.search_ids) == seen["nodes_at_claim"], "the old worker wrote after the new claim"
    assert store.get_job(job).worker == "w2"


def test_final_results_are_not_written_by_a_lost_worker(store) -> None:
    plan = store.create_batch(problems(2), [MCTS], model="scripted", task="mgsm", chunk_size=2)
    (job,) = plan.job_ids
    original = store.write_results

    def taken_over_first(results, *args, **kwargs):
        take_over(store, job)  # the lease ran out between the last round and the results
        return original(results, *args, **kwargs)

    store.write_results = taken_over_first  # type: ignore[method-assign]
    try:
        outcome = execute_job(store, job, hooked(lambda _: None), "w1", lease_s=60)
    finally:
        del store.write_results
    assert outcome.status == "lost", outcome
    with store.sessions() as s:
        answered = s.scalar(select(func.count()).select_from(Search).where(Search.job_id == job, Search.final_answer.is_not(None)))
    assert answered == 0, "a worker whose lease was lost wrote its answers"


def test_a_long_job_stops_within_one_renewal_period_of_losing_its_lease(store, monkeypatch) -> None:
    import marco.synthesis.job as synthesis_job
    from marco.store.store import Store as _Store  # noqa: F401

    plan = store.create_batch(problems(2), [MCTS], model="scripted", task="mgsm", chunk_size=2)
    assert execute_job(store, plan.job_ids[0], BackendCache(), "w0", lease_s=60).status == "done"
    run_id, job = synthesis_job.plan_synthesis(store, synthesis_job.SynthesisConfig(batches=[plan.batch_id]))
    real = synthesis_job.synthesize
    started = threading.Event()

    def slow_synthesize(*args, **kwargs):  # a long step in Python (hours of SFT, in small)
        started.set()
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthesis_job, "synthesize", slow_synthesize)
    lease_s = 1.5
    result: dict[str, object] = {}

    def run() -> None:
        result["outcome"] = execute_job(store, job, BackendCache(), "w1", lease_s=lease_s)
        result["at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    time.sleep(0.2)
    take_over(store, job)  # a failover longer than the lease: another worker has the job now
    lost_at = time.monotonic()
    t.join(30)
    assert result["outcome"].status == "lost", result["outcome"]
    assert result["at"] - lost_at < lease_s / 3 + 1.0, "the old run went on after losing its lease"
    with store.sessions() as s:
        assert not s.scalar(select(Batch.config).where(Batch.id == run_id)).get("result"), "a lost run recorded its result"
    assert store.cot_examples(run_id) == []


# --- 4. a worker's identity -------------------------------------------------------------------------------
def test_same_host_and_pid_never_share_a_lease(store) -> None:
    from worker.runtime import WorkerRuntime
    from worker.settings import QueueSettings

    a = WorkerRuntime(QueueSettings(), name="w1@box:7")
    b = WorkerRuntime(QueueSettings(), name="w1@box:7")  # another container, same hostname and pid
    assert a.name != b.name
    plan = store.create_batch(problems(1), [MCTS], model="scripted", task="mgsm", chunk_size=1)
    (job,) = plan.job_ids
    assert store.claim_job(job, "w1@box:7", 60) is not None  # a live claim (one thread of a threads pool)
    # another thread's task retried after a transient error, under the same name: it must not take it
    assert store.claim_job(job, "w1@box:7", 60, reclaim=True) is None


# --- 5. progress leases, on every pool --------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_a_hung_job_is_ended_and_says_so_on_every_pool(pool, store, dispatcher, fault_env, tmp_path) -> None:
    from worker.harness import start_worker

    env = {**fault_env, "MARCO_PROGRESS_TIMEOUT": "3"}
    proc = start_worker(env, tmp_path / "logs", name=f"hang-{pool}", queues="reason", pool=pool)
    try:
        one_round = SearchConfigOneRound
        batch = submit(store, dispatcher, n=1, chunk=1, model="scripted:round=60", config=one_round)
        assert wait_ended(store, batch.batch_id, 25) == "failed", proc.output()[-3000:]
        error = store.get_job(batch.plan.job_ids[0]).error
        assert "no progress for over 3s" in error, error
    finally:
        proc.kill()


SearchConfigOneRound = SearchConfig(strategy="mcts", action="ministep:6", budget=400, children=2, max_rounds=2, seed=3)


# --- 6. database session limits ---------------------------------------------------------------------------
def test_product_connections_carry_session_limits(fault_env, monkeypatch) -> None:
    monkeypatch.delenv("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT", raising=False)  # the product's defaults, not fault_env's
    url = fault_env["MARCO_DIRECT_DATABASE_URL"]
    s = Store.open(url)
    try:
        with s.engine.connect() as conn:
            shown = {n: conn.execute(text(f"SHOW {n}")).scalar() for n in
                     ("idle_in_transaction_session_timeout", "lock_timeout", "statement_timeout", "tcp_keepalives_idle")}
            raw = conn.connection.dbapi_connection
            sock = socket.socket(fileno=os.dup(raw.pgconn.socket))
            try:
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            finally:
                sock.close()
    finally:
        s.close()
    assert shown == {"idle_in_transaction_session_timeout": "2min", "lock_timeout": "30s",
                     "statement_timeout": "10min", "tcp_keepalives_idle": "30"}, shown
    assert keepalive == 1 and idle == 30

    # a worker lost mid-transaction: the server ends its transaction and frees the rows it locked
    monkeypatch.setenv("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT", "1")
    lost = Store.open(url)
    plan = lost.create_batch(problems(1), [MCTS], model="scripted", task="mgsm", chunk_size=1)
    (job,) = plan.job_ids
    conn = lost.engine.connect()
    conn.execute(text("SELECT id FROM jobs WHERE id = :j FOR UPDATE"), {"j": job})  # then nothing: a hung host
    monkeypatch.delenv("MARCO_DB_IDLE_IN_TRANSACTION_TIMEOUT")
    time.sleep(2.5)
    other = Store.open(url)
    try:
        with other.engine.begin() as c:
            c.execute(text("SET LOCAL lock_timeout = '3s'"))
            c.execute(text("UPDATE jobs SET resends = resends + 1 WHERE id = :j"), {"j": job})  # not blocked
    finally:
        other.close()
        conn.invalidate()
        lost.close()


# --- 7. smaller points ------------------------------------------------------------------------------------
def test_a_heartbeat_after_the_jobs_own_end_is_no_lease_loss(store) -> None:
    plan = store.create_batch(problems(1), [MCTS], model="scripted", task="mgsm", chunk_size=1)
    (job,) = plan.job_ids
    claim = store.claim_job(job, "w1", 60)
    hb = Heartbeat(store, job, "w1", 60, period_s=0.1)
    hb.token = getattr(claim, "token", None)
    with hb:
        assert store.finish_job(job, "w1")
        time.sleep(0.5)  # the heartbeat fires between the finish and leaving the block
    row = store.get_job(job)
    assert row.status == "done" and row.lease_losses == 0, (row.status, row.lease_losses)


def test_the_soak_sees_a_double_run_by_its_per_run_markers(store) -> None:
    """bench/soak.py: every node carries its run's marker; a resume is in order, a double run is not."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak_bench", path)
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak  # its dataclasses look their module up
    spec.loader.exec_module(soak)
    plan = store.create_batch(problems(2), [LONG], model="scripted", task="mgsm", chunk_size=1)
    first, second = plan.job_ids

    def stop_after_two_rounds(n: int) -> None:
        if n == 3:
            SHUTDOWN.set()

    try:
        assert execute_job(store, first, hooked(stop_after_two_rounds), "w1", lease_s=60).status == "released"
    finally:
        SHUTDOWN.clear()
    assert execute_job(store, first, BackendCache(), "w2", lease_s=60).status == "done"  # a resume: in order
    assert execute_job(store, second, BackendCache(), "w1", lease_s=60).status == "done"
    assert soak.run_markers(store, plan.batch_id) == {}
    with store.sessions() as s:
        claims = sorted({c for c in s.scalars(select(NodeRow.claim).join(Search, Search.id == NodeRow.search_id)
                                                .where(Search.job_id == first))})
    assert claims == [1, 2], claims  # each run's marker
    # what an unfenced double run leaves: a later node written by the older claim
    with store.sessions.begin() as s:
        sid = s.scalar(select(Search.id).where(Search.job_id == second))
        last = s.scalar(select(func.max(NodeRow.seq)).where(NodeRow.search_id == sid))
        s.execute(update(NodeRow).where(NodeRow.search_id == sid, NodeRow.seq == last).values(claim=0))
    assert soak.run_markers(store, plan.batch_id) == {second: 1}
