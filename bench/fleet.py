"""The queue and the store under many workers: 1, 4, 16, 64 real worker processes on this machine.

    PYTHONPATH=. .venv/bin/python bench/fleet.py [--sizes 1,4,16,64] [--problems 40000] [--window 60]
        [--kill-sizes 16 --kill-every 60] [--slow-factor 10] [--pool-size 1 --max-overflow 1]
    PYTHONPATH=. .venv/bin/python bench/fleet.py --sizes 64 --problems 40000 --window 60 --warmup 30 --submit-during 100000

Each worker is a real ``celery worker --pool solo`` process (one process = one GPU's worker) running the
scripted backend: each generate step sleeps ``--round-s`` and returns ~60-100 character tokens per sample, so
the model is never the bottleneck and every cost measured is the queue's and the store's. For each fleet
size: a fresh Postgres database and Redis db number, ``--batches`` batches totalling ``--problems``
problems submitted at once (the backlog is far larger than the window drains: every claim runs against
a full jobs table), then ``--window`` seconds of steady state measured:

- problems/s (searches ended), nodes written/s, tokens/s;
- claim latency p50/p99 (the workers' ``marco_claim_seconds`` histograms, scraped over HTTP);
- lease renewals/s (``marco_lease_renewals_total``), store write latency p50/p99 per round;
- Postgres connections (max and mean of ``pg_stat_activity`` for the database, sampled every second);
- row writes per node (``pg_stat_user_tables`` inserts + updates, all tables, over nodes inserted), table
  bytes per node (``pg_total_relation_size('nodes')``), WAL bytes per node;
- scheduler tick time (a scheduler in this process, every 2 s), Redis used memory;
- worker RSS (mean per process), and the machine's load average.

``--kill-sizes`` repeats those sizes with one worker SIGKILLed every ``--kill-every`` seconds (a replacement
starts at once); the scheduler re-queues its job when the lease expires. ``--slow-factor F`` adds the
hostage run: 16 workers, one of them F times slower, one batch run to its end; it reports the batch's job
latencies (p50/p99/max), the slow worker's share and any job run twice.

Last line: ``fleet_scaling_efficiency_16: X`` (16-worker problems/s / (16 x one-worker problems/s)).
Runs on shared machines: report ``uptime`` with the figures.

``--submit-during N`` (issue 18, a big submission on a busy fleet) runs instead, for each of ``--sizes``: the
fleet busy on the ordinary backlog (``--problems``), claims measured for ``--window`` seconds of steady
state, then one batch of N problems submitted from a separate process through the product's submit path
(``scheduler.submit.submit`` with the real Celery dispatcher, as ``marco submit`` does: ``--submit-rows-per-txn``
problems per transaction, ``--submit-chunk`` problems per job, at ``--submit-priority``, above the backlog's
0, so its first jobs are claimed while the rest is written). It reports the submission's wall time, chunk
write time (median/max), rows/s; the workers' claim latency before vs during it (p50/p99/mean); the longest
lock wait of any claim and of any statement (``pg_stat_activity`` ``wait_event_type = 'Lock'``, sampled every
``--lock-sample-ms``); what ``marco status --json`` showed of the batch while it was written and how many of
its jobs were claimed/done before the last chunk's transaction began; that every job, problem and search is
there once; and that the batch did not close before the last chunk. Kill and hostage runs are skipped.
Last line: ``submit_during_claim_p99_ratio: X`` (claim p99 during the submission / before it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sqlalchemy import create_engine, func, select, text  # noqa: E402

from marco.search.base import SearchConfig  # noqa: E402
from marco.store import Store  # noqa: E402
from marco.store.models import Batch, Job, NodeRow, ProblemRow, Search  # noqa: E402
from marco.tasks.base import Problem  # noqa: E402
from queue_overhead import PG_ADMIN, admin, claim_redis_db  # noqa: E402
from scheduler.dispatch import CeleryDispatcher  # noqa: E402
from scheduler.progress import snapshot  # noqa: E402
from scheduler.service import Scheduler, SchedulerConfig  # noqa: E402
from scheduler.submit import SUBMIT_ROWS_PER_TXN, SubmitRequest, submit  # noqa: E402
from worker.harness import Proc, _start  # noqa: E402
from worker.launch import celery_command, worker_argv  # noqa: E402
from worker.settings import QueueSettings  # noqa: E402

LEASE_S = 6  # --lease: renewed every 2 s, so renewals show in a short window (production: 120 s, every 40 s)
CONFIG = SearchConfig(strategy="mcts", action="ministep:32", budget=256, children=2, max_depth=4, max_answer_tokens=32, seed=3)


# --- metrics scraped from the workers --------------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except Exception:
        return {}  # a worker just killed, or not serving yet
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


def fleet_sum(scrapes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for s in scrapes:
        for k, v in s.items():
            total[k] = total.get(k, 0.0) + v
    return total


def quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float | None:
    """``q``-quantile of histogram ``name`` over the interval (bucket counts after - before), linearly
    interpolated inside its bucket as Prometheus' ``histogram_quantile`` does."""
    buckets = []
    for k, v in after.items():
        if k.startswith(name + "_bucket{"):
            le = k.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), v - before.get(k, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, prev_le, prev_n = q * buckets[-1][1], 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1.0)
        prev_le, prev_n = le, n
    return None


# --- the fleet ------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    env: dict[str, str]
    log_dir: Path
    base_port: int
    procs: dict[int, Proc] = field(default_factory=dict)
    killed: int = 0

    def start(self, i: int, extra: dict[str, str] | None = None) -> Proc:
        env = {**self.env, "MARCO_METRICS_PORT": str(self.base_port + i), **(extra or {})}
        argv = celery_command(worker_argv("reason", 1, f"f{i}-{uuid.uuid4().hex[:4]}@%h", "solo", "WARNING"))
        proc = _start(argv, env, self.log_dir / f"w{i}.log", f"w{i}")
        self.procs[i] = proc
        return proc

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Every worker serves its metrics (solo pool: it has imported everything and is consuming)."""
        deadline = time.monotonic() + timeout_s
        pending = set(self.procs)
        while pending:
            for i in list(pending):
                if self.procs[i].popen.poll() is not None:
                    raise RuntimeError(f"worker {i} exited:\n{self.procs[i].output()[-2000:]}")
                if scrape(self.base_port + i):
                    pending.discard(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} worker(s) not up after {timeout_s}s")
            time.sleep(0.5)

    def scrape_all(self) -> dict[str, float]:
        return fleet_sum([scrape(self.base_port + i) for i in self.procs])

    def kill_one(self, rng: random.Random) -> None:
        i = rng.choice(sorted(self.procs))
        self.procs[i].kill(signal.SIGKILL)
        self.procs[i].popen.wait(10)
        self.killed += 1
        self.start(i)

    def rss_mb(self) -> list[float]:
        out = []
        for p in self.procs.values():
            try:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out.append(int(line.split()[1]) / 1024)
            except OSError:
                pass
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill(signal.SIGKILL)
        for p in self.procs.values():
            try:
                p.popen.wait(10)
            except Exception:
                pass


CLK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system) ``pid`` has used so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by ``pids`` (those still alive)."""
    return sum(c for c in map(cpu_of, pids) if c is not None)


def backend_pids(store: Store, db_name: str) -> list[int]:
    with store.engine.connect() as c:
        return [int(r[0]) for r in c.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d"), {"d": db_name})]


class Sampler(threading.Thread):
    """Postgres connections to the bench database, once a second."""

    def __init__(self, store: Store, db_name: str) -> None:
        super().__init__(daemon=True)
        self.store, self.db_name = store, db_name
        self.samples: list[int] = []
        self.stop_event = threading.Event()
        # CPU of the database's backends: first and last reading of each (a backend born in the window from 0);
        # pooled overflow connections come and go, so a pid list taken once would miss or lose some
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.started = False

    def backend_cpu_s(self) -> float:
        return sum(self.last[p] - self.first[p] for p in self.last)

    def run(self) -> None:
        while True:
            try:
                pids = backend_pids(self.store, self.db_name)
                self.samples.append(len(pids))
                for pid in pids:
                    c = cpu_of(pid)
                    if c is not None:
                        self.first.setdefault(pid, c if not self.started else 0.0)
                        self.last[pid] = c
                self.started = True
            except Exception:
                pass
            if self.stop_event.wait(1.0):
                return


class SchedulerLoop(threading.Thread):
    def __init__(self, scheduler: Scheduler, interval_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.scheduler, self.interval_s = scheduler, interval_s
        self.ticks: list[float] = []
        self.requeued = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                report = self.scheduler.tick()
                self.ticks.append(self.scheduler.last_tick_s)
                self.requeued += len(report.requeued)
            except Exception as exc:
                print(f"  scheduler tick failed: {exc}", flush=True)


def problems_for(batch: int | str, n: int) -> list[Problem]:
    return [Problem("demo", "en", i, f"Batch {batch} problem {i}: what is 6 times 7?", ("42",)) for i in range(n)]


def store_counts(store: Store, batch_ids: list[str]) -> dict[str, float]:
    with store.sessions() as s:
        ended = s.scalar(select(func.count()).select_from(Search).where(Search.status.in_(("done", "failed"))))
        tokens = s.scalar(select(func.coalesce(func.sum(Search.tokens), 0)).where(Search.status.in_(("done", "failed"))))
        nodes = s.scalar(select(func.count()).select_from(NodeRow))
        writes = s.execute(text("SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables")).scalar()
        wal = s.execute(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")).scalar()
    return {"ended": ended or 0, "tokens": tokens or 0, "nodes": nodes or 0, "writes": float(writes or 0), "wal": float(wal or 0)}


def submit_all(store: Store, dispatcher: CeleryDispatcher, problems: int, batches: int, chunk: int, model: str) -> tuple[list[str], float]:
    """``batches`` batches at once (one thread each, as several users would), ``problems`` in all."""
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(b: int) -> None:
        try:
            # chunked as `marco submit` does: workers start on the first chunk while the rest is written
            plan = store.create_batch(
                problems_for(b, problems // batches), [CONFIG], model=model, task="demo", chunk_size=chunk, name=f"fleet-{b}",
                rows_per_txn=SUBMIT_ROWS_PER_TXN, on_chunk=lambda ids, done, total: dispatcher.enqueue([(j, "reason") for j in ids]),
            )
            with lock:
                ids.append(plan.batch_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(b,)) for b in range(batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ids, time.perf_counter() - t0


@dataclass
class Row:
    label: str
    workers: int
    values: dict[str, Any]


def fresh_cluster(args: argparse.Namespace) -> tuple[str, str, Any, dict[str, str]]:
    """A new scratch database and a free Redis database number: ``(db_name, db_url, redis_client, env)``,
    env being what every worker of the run gets."""
    db_name = f"marco_fleet_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{db_name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db_name
    broker, redis_client = claim_redis_db()
    env = {"MARCO_BROKER_URL": broker, "MARCO_DATABASE_URL": db_url, "MARCO_LEASE_SECONDS": str(LEASE_S), "OMP_NUM_THREADS": "1"}
    if args.pool_size is not None:
        env["MARCO_DB_POOL_SIZE"] = str(args.pool_size)
    if args.max_overflow is not None:
        env["MARCO_DB_MAX_OVERFLOW"] = str(args.max_overflow)
    return db_name, db_url, redis_client, env


def run_size(args: argparse.Namespace, n: int, kill_every: float, base_port: int) -> Row:
    db_name, db_url, redis_client, env = fresh_cluster(args)
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="marco-fleet-")), base_port)
    store = Store.open(db_url)
    label = f"{n}" + (f"+kill/{kill_every:.0f}s" if kill_every else "")
    sampler = sched = None
    try:
        t0 = time.perf_counter()
        for i in range(n):
            fleet.start(i)
        fleet.wait_ready()
        startup_s = time.perf_counter() - t0
        dispatcher = CeleryDispatcher(QueueSettings.from_env(env))
        model = f"scripted:round={args.round_s}"
        m_pre = fleet.scrape_all()
        batch_ids, submit_s = submit_all(store, dispatcher, args.problems, args.batches, args.chunk, model)
        m_post = fleet.scrape_all()  # claims made while the batches were being written
        sched = SchedulerLoop(Scheduler(store, dispatcher, SchedulerConfig(interval_s=2.0, stale_queued_s=600)))
        sched.start()
        time.sleep(args.warmup)  # every worker has taken a job and written rounds
        sampler = Sampler(store, db_name)
        sampler.start()
        m0, c0, t_start = fleet.scrape_all(), store_counts(store, batch_ids), time.perf_counter()
        wpids = [p.pid for p in fleet.procs.values()]
        w_cpu0 = cpu_s(wpids)
        rng = random.Random(7)
        next_kill = time.monotonic() + kill_every if kill_every else float("inf")
        while time.perf_counter() - t_start < args.window:
            time.sleep(0.5)
            if time.monotonic() >= next_kill:
                fleet.kill_one(rng)
                next_kill += kill_every
        m1, c1, window = fleet.scrape_all(), store_counts(store, batch_ids), time.perf_counter() - t_start
        w_cpu = cpu_s(wpids) - w_cpu0  # a worker killed meanwhile drops out (kill runs undercount)
        sampler.stop_event.set()
        sampler.join(5)
        p_cpu = sampler.backend_cpu_s()
        rss = fleet.rss_mb()
        with store.sessions() as s:
            nodes_bytes = s.execute(text("SELECT pg_total_relation_size('nodes')")).scalar() or 0
            dup = s.execute(text("SELECT count(*) FROM (SELECT 1 FROM nodes GROUP BY search_id, parent_id, sibling_index HAVING count(*) > 1) d")).scalar()
            answers_twice = s.scalar(select(func.count()).select_from(Job).where(Job.attempts > 1))
        redis_mem = int(redis_client.info("memory")["used_memory"])  # type: ignore[attr-defined]
        d = {k: c1[k] - c0[k] for k in c1}
        g = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
        ticks = sched.ticks or [0.0]
        conns = sampler.samples or [0]
        vals = {
            "startup_s": startup_s,
            "submit_s": submit_s,
            "problems_s": d["ended"] / window,
            "nodes_s": d["nodes"] / window,
            "tokens_s": d["tokens"] / window,
            "claim_p50_ms": 1000 * (quantile(m0, m1, "marco_claim_seconds", 0.5) or 0),
            "claim_p99_ms": 1000 * (quantile(m0, m1, "marco_claim_seconds", 0.99) or 0),
            "claims": g.get("marco_claim_seconds_count", 0.0),
            "claim_sub_p99_ms": 1000 * (quantile(m_pre, m_post, "marco_claim_seconds", 0.99) or 0),
            "claims_during_submit": m_post.get("marco_claim_seconds_count", 0.0) - m_pre.get("marco_claim_seconds_count", 0.0),
            "write_p50_ms": 1000 * (quantile(m0, m1, "marco_store_write_seconds", 0.5) or 0),
            "write_p99_ms": 1000 * (quantile(m0, m1, "marco_store_write_seconds", 0.99) or 0),
            "renewals_s": g.get("marco_lease_renewals_total", 0.0) / window,
            "pg_conn_max": max(conns),
            "pg_conn_mean": statistics.mean(conns),
            "writes_per_node": d["writes"] / d["nodes"] if d["nodes"] else 0.0,
            "bytes_per_node": nodes_bytes / c1["nodes"] if c1["nodes"] else 0.0,
            "wal_per_node": d["wal"] / d["nodes"] if d["nodes"] else 0.0,
            "worker_cpu_ms_node": 1000 * w_cpu / d["nodes"] if d["nodes"] else 0.0,
            "pg_cpu_ms_node": 1000 * p_cpu / d["nodes"] if d["nodes"] else 0.0,
            "tick_p50_ms": 1000 * statistics.median(ticks),
            "tick_max_ms": 1000 * max(ticks),
            "redis_mb": redis_mem / 2**20,
            "rss_mb": statistics.mean(rss) if rss else 0.0,
            "killed": fleet.killed,
            "requeued": sched.requeued,
            "dup_nodes": dup,
            "jobs_retried": answers_twice,
            "load1": os.getloadavg()[0],
        }
        return Row(label, n, vals)
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        if sched is not None:
            sched.stop_event.set()
            sched.join(10)
        fleet.stop()
        store.close()
        redis_client.flushdb()  # type: ignore[attr-defined]
        admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def run_hostage(args: argparse.Namespace, n: int, base_port: int) -> dict[str, Any]:
    """``n`` workers, worker 0 ``--slow-factor`` times slower; one batch of 4 jobs per worker to its end."""
    db_name = f"marco_fleet_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{db_name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db_name
    broker, redis_client = claim_redis_db()
    env = {"MARCO_BROKER_URL": broker, "MARCO_DATABASE_URL": db_url, "MARCO_LEASE_SECONDS": str(LEASE_S), "OMP_NUM_THREADS": "1"}
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="marco-hostage-")), base_port)
    store = Store.open(db_url)
    try:
        for i in range(n):
            fleet.start(i, {"MARCO_SCRIPTED_SLOWDOWN": str(args.slow_factor)} if i == 0 else None)
        fleet.wait_ready()
        dispatcher = CeleryDispatcher(QueueSettings.from_env(env))
        sched = SchedulerLoop(Scheduler(store, dispatcher, SchedulerConfig(interval_s=2.0)))
        sched.start()
        ids, _ = submit_all(store, dispatcher, 4 * n * args.chunk, 1, args.chunk, f"scripted:round={args.round_s}")
        t0 = time.perf_counter()
        while store.get_batch(ids[0]).status in ("queued", "running"):
            time.sleep(0.5)
            if time.perf_counter() - t0 > 1800:
                raise TimeoutError("hostage batch did not end in 30 min")
        batch_s = time.perf_counter() - t0
        sched.stop_event.set()
        with store.sessions() as s:
            jobs = s.execute(select(Job.worker, Job.started_at, Job.finished_at, Job.attempts, Job.status).where(Job.batch_id == ids[0])).all()
        took = {i: (j.finished_at - j.started_at).total_seconds() for i, j in enumerate(jobs)}
        durations = sorted(took.values())
        slow = {i for i, j in enumerate(jobs) if (j.worker or "").startswith("f0-")}
        fast_end = max((j.finished_at for i, j in enumerate(jobs) if i not in slow), default=None)
        last_end = max(j.finished_at for j in jobs)
        return {
            "workers": n, "jobs": len(jobs), "batch_s": batch_s,
            "job_p50_s": durations[len(durations) // 2], "job_p99_s": durations[min(len(durations) - 1, int(0.99 * len(durations)))],
            "job_max_s": durations[-1], "slow_jobs": len(slow),
            "slow_job_mean_s": statistics.mean([took[i] for i in slow]) if slow else 0.0,
            "fast_job_mean_s": statistics.mean([took[i] for i in took if i not in slow] or [0.0]),
            "tail_after_others_s": (last_end - fast_end).total_seconds() if fast_end else 0.0,
            "retried": sum(j.attempts > 1 for j in jobs), "not_done": sum(j.status != "done" for j in jobs),
        }
    finally:
        fleet.stop()
        store.close()
        redis_client.flushdb()  # type: ignore[attr-defined]
        admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


# --- a big submission on a busy fleet (--submit-during) -------------------------------------------------
class TimedDispatcher(CeleryDispatcher):
    """The real Celery dispatcher, timing each send: a chunk's write is the time between two sends."""

    def __init__(self, settings: QueueSettings) -> None:
        super().__init__(settings)
        self.sends: list[tuple[float, float, int]] = []  # (start, end, messages), wall clock

    def enqueue(self, jobs: Any, priority: int = 0) -> None:
        t0 = time.time()
        super().enqueue(jobs, priority)
        self.sends.append((t0, time.time(), len(jobs)))


def submit_child(env: dict[str, str], db_url: str, name: str, n: int, chunk: int, rows_per_txn: int, priority: int,
                 model: str, go: Any, out: Any) -> None:
    """The submitting process, as ``marco submit`` is one: plans ``n`` problems, says ready, waits for ``go``,
    then submits them through ``scheduler.submit.submit`` and sends back its timings."""
    try:
        store = Store.open(db_url)
        dispatcher = TimedDispatcher(QueueSettings.from_env(env))
        problems = problems_for("S", n)
        request = SubmitRequest(task="demo", configs=[CONFIG], model=model, chunk=chunk, name=name, priority=priority)
        progress: list[tuple[float, int]] = []
        out.put(("ready", None))
        if not go.wait(3600):
            return
        t0 = time.time()
        plan = submit(store, dispatcher, request, problems, rows_per_txn=rows_per_txn,
                      progress=lambda done, total: progress.append((time.time(), done)))
        t1 = time.time()
        out.put(("done", {"t0": t0, "t1": t1, "sends": dispatcher.sends, "progress": progress, "batch_id": plan.batch_id,
                          "jobs": len(plan.job_ids), "distinct_jobs": len(set(plan.job_ids)),
                          "problems": len(plan.problem_ids), "searches": len(plan.search_ids)}))
        store.close()
    except BaseException:  # noqa: BLE001
        import traceback

        out.put(("error", traceback.format_exc()))


def receive(out: Any, child: Any, timeout_s: float) -> tuple[str, Any]:
    """The submitting process's next message (an error when it died or said nothing in ``timeout_s``)."""
    import queue as queue_mod

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1.0)
        except queue_mod.Empty:
            if not child.is_alive():
                return "error", f"the submitting process exited ({child.exitcode})"
    return "error", f"no word from the submitting process in {timeout_s:.0f}s"


# a backend waiting for a heavyweight lock (a row, a table, a transaction id: pg_locks.granted = false); a claim
# is the claim's conditional UPDATE of its job (the only statement that raises attempts) or of its batch
LOCK_WAITS = text("""
    SELECT w.pid, w.query_start, extract(epoch FROM clock_timestamp() - w.query_start) AS waited,
           (w.query ILIKE 'UPDATE jobs SET%jobs.attempts +%' OR w.query ILIKE 'UPDATE batches SET status%started_at%') AS claim,
           left(w.query, 60) AS query, w.wait_event,
           (SELECT left(b.query, 60) FROM pg_stat_activity b WHERE b.pid = (pg_blocking_pids(w.pid))[1]) AS blocker
    FROM pg_stat_activity w
    WHERE w.datname = :d AND w.wait_event_type = 'Lock' AND w.state = 'active' AND w.pid <> pg_backend_pid()
""")


class LockSampler(threading.Thread):
    """Lock waits in the bench database, every ``interval_s``: the longest each wait was seen to last, by phase
    (a wait shorter than the interval may be missed; one that spans samples is measured to within it)."""

    def __init__(self, db_url: str, db_name: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(db_url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=0)
        self.db_name, self.interval_s = db_name, interval_s
        self.phase = "before"
        self.samples: dict[str, int] = {}
        self.waits: dict[str, dict[tuple[int, Any], dict[str, Any]]] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            with self.engine.connect() as c:
                while not self.stop_event.is_set():
                    phase = self.phase
                    rows = c.execute(LOCK_WAITS, {"d": self.db_name}).all()
                    self.samples[phase] = self.samples.get(phase, 0) + 1
                    waits = self.waits.setdefault(phase, {})
                    for r in rows:
                        key = (r.pid, r.query_start)
                        if key not in waits or float(r.waited) > waits[key]["waited_s"]:
                            waits[key] = {"waited_s": float(r.waited), "claim": bool(r.claim), "query": r.query,
                                          "event": r.wait_event, "blocker": r.blocker}
                    self.stop_event.wait(self.interval_s)
        except Exception as exc:  # the database dropped under it at the end
            print(f"  lock sampler stopped: {exc}", flush=True)
        finally:
            self.engine.dispose()

    def summary(self, phase: str) -> dict[str, Any]:
        waits = list(self.waits.get(phase, {}).values())
        claims = [w for w in waits if w["claim"]]
        worst = max(waits, key=lambda w: w["waited_s"], default=None)
        return {
            "samples": self.samples.get(phase, 0),
            "lock_waits": len(waits),
            "claim_lock_waits": len(claims),
            "claim_lock_wait_max_ms": 1000 * max((w["waited_s"] for w in claims), default=0.0),
            "any_lock_wait_max_ms": 1000 * worst["waited_s"] if worst else 0.0,
            "longest_wait": worst,
        }


class StatusSampler(threading.Thread):
    """What ``marco status --json`` shows of the batch being submitted (``scheduler.progress.snapshot``)."""

    def __init__(self, store: Store, name: str, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.store, self.name, self.interval_s = store, name, interval_s
        self.batch_id: str | None = None
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if self.batch_id is None:
                    with self.store.sessions() as s:
                        found = s.scalar(select(Batch.id).where(Batch.name == self.name))
                    self.batch_id = str(found) if found else None
                if self.batch_id is not None:
                    snap = snapshot(self.store, self.batch_id).to_dict()
                    if not self.stop_event.is_set():  # taken while the submission still ran
                        self.samples.append({"t": time.time(), "status": snap["status"], "jobs": snap["jobs"]})
            except Exception as exc:
                print(f"  status sample failed: {exc}", flush=True)
            self.stop_event.wait(self.interval_s)


def claim_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    n = after.get("marco_claim_seconds_count", 0.0) - before.get("marco_claim_seconds_count", 0.0)
    total = after.get("marco_claim_seconds_sum", 0.0) - before.get("marco_claim_seconds_sum", 0.0)
    return {
        "claims": n,
        "p50_ms": 1000 * (quantile(before, after, "marco_claim_seconds", 0.5) or 0.0),
        "p99_ms": 1000 * (quantile(before, after, "marco_claim_seconds", 0.99) or 0.0),
        "mean_ms": 1000 * total / n if n else 0.0,
    }


def run_submit_during(args: argparse.Namespace, n: int, base_port: int) -> dict[str, Any]:
    """``n`` workers busy on the backlog; ``--window`` s of claims measured, then ``--submit-during`` problems
    submitted from another process while the workers keep claiming."""
    db_name, db_url, redis_client, env = fresh_cluster(args)
    fleet = Fleet(env, Path(tempfile.mkdtemp(prefix="marco-submit-during-")), base_port)
    store = Store.open(db_url)
    model = f"scripted:round={args.round_s}"
    name = f"submit-during-{uuid.uuid4().hex[:6]}"
    total = args.submit_during
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as `marco submit` is
    out, go = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=submit_child, args=(env, db_url, name, total, args.submit_chunk, args.submit_rows_per_txn,
                                                    args.submit_priority, model, go, out), daemon=True)
    sched = locks = status = None
    try:
        child.start()  # it plans its problems while the fleet starts
        for i in range(n):
            fleet.start(i)
        fleet.wait_ready()
        dispatcher = CeleryDispatcher(QueueSettings.from_env(env))
        submit_all(store, dispatcher, args.problems, args.batches, args.chunk, model)  # the ordinary backlog
        sched = SchedulerLoop(Scheduler(store, dispatcher, SchedulerConfig(interval_s=2.0, stale_queued_s=600)))
        sched.start()
        time.sleep(args.warmup)  # every worker has taken a job: steady state
        kind, msg = receive(out, child, 600)
        if kind != "ready":
            raise RuntimeError(f"submitting process: {msg}")
        locks = LockSampler(db_url, db_name, args.lock_sample_ms / 1000)
        locks.start()
        m_b0 = fleet.scrape_all()
        time.sleep(args.window)
        m_b1 = fleet.scrape_all()
        locks.phase = "during"
        status = StatusSampler(store, name, args.status_every)
        status.start()
        m_s0 = fleet.scrape_all()
        go.set()
        kind, res = receive(out, child, args.submit_timeout)
        m_s1 = fleet.scrape_all()
        locks.phase = "after"
        status.stop_event.set()
        locks.stop_event.set()
        status.join(30)
        locks.join(10)
        if kind != "done":
            raise RuntimeError(f"submitting process: {res}")
        child.join(30)
        load1 = os.getloadavg()[0]

        batch_id = res["batch_id"]
        with store.sessions() as s:
            jobs_n, seqs_n, last_chunk_at = s.execute(
                select(func.count(), func.count(func.distinct(Job.seq)), func.max(Job.created_at)).where(Job.batch_id == batch_id)
            ).one()
            # the last chunk's jobs carry its transaction's start time: what was claimed or done before it began
            claimed_before = s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id, Job.started_at < last_chunk_at))
            done_before = s.scalar(select(func.count()).select_from(Job).where(
                Job.batch_id == batch_id, Job.status == "done", Job.finished_at < last_chunk_at))
            problems_n = s.scalar(select(func.count()).select_from(ProblemRow).where(ProblemRow.batch_id == batch_id))
            searches_n, searched_problems = s.execute(
                select(func.count(), func.count(func.distinct(Search.problem_id))).where(Search.batch_id == batch_id)).one()
            batch = s.get(Batch, batch_id)
            batch_status, batch_finished, marker = batch.status, batch.finished_at, bool((batch.config or {}).get("submitting"))

        expected_jobs = -(-total // args.submit_chunk)
        sends = sorted(res["sends"])
        t0, t1 = res["t0"], res["t1"]
        wall = t1 - t0
        chunk_writes = [sends[k][0] - sends[k - 1][1] for k in range(1, len(sends))] or [sends[0][0] - t0]
        enqueues = [e - b for b, e, _ in sends]
        rows = res["problems"] + res["jobs"] + res["searches"] + 1
        during = [x for x in status.samples if x["t"] < t1]
        claimed_seen = [x["jobs"]["running"] + x["jobs"]["done"] + x["jobs"]["failed"] for x in during]
        before, sub = claim_figures(m_b0, m_b1), claim_figures(m_s0, m_s1)
        lock_before, lock_during = locks.summary("before"), locks.summary("during")
        return {
            "workers": n, "problems": total, "chunk": args.submit_chunk, "rows_per_txn": args.submit_rows_per_txn,
            "priority": args.submit_priority, "backlog_problems": args.problems,
            "submit_s": wall, "chunks": len(sends), "first_enqueue_s": sends[0][0] - t0 if sends else 0.0,
            "chunk_write_median_ms": 1000 * statistics.median(chunk_writes), "chunk_write_max_ms": 1000 * max(chunk_writes),
            "enqueue_median_ms": 1000 * statistics.median(enqueues) if enqueues else 0.0,
            "rows": rows, "rows_s": rows / wall if wall else 0.0, "problems_s": total / wall if wall else 0.0,
            "before_window_s": args.window,
            "claims_before": before["claims"], "claim_before_p50_ms": before["p50_ms"], "claim_before_p99_ms": before["p99_ms"],
            "claim_before_mean_ms": before["mean_ms"],
            "claims_during": sub["claims"], "claim_during_p50_ms": sub["p50_ms"], "claim_during_p99_ms": sub["p99_ms"],
            "claim_during_mean_ms": sub["mean_ms"],
            "claim_p99_ratio": sub["p99_ms"] / before["p99_ms"] if before["p99_ms"] and sub["claims"] else float("nan"),
            "lock_sample_ms": args.lock_sample_ms,
            "lock_samples_before": lock_before["samples"], "lock_samples_during": lock_during["samples"],
            "lock_waits_before": lock_before["lock_waits"], "lock_waits_during": lock_during["lock_waits"],
            "claim_lock_waits_during": lock_during["claim_lock_waits"],
            "claim_lock_wait_max_ms_before": lock_before["claim_lock_wait_max_ms"],
            "claim_lock_wait_max_ms_during": lock_during["claim_lock_wait_max_ms"],
            "any_lock_wait_max_ms_before": lock_before["any_lock_wait_max_ms"],
            "any_lock_wait_max_ms_during": lock_during["any_lock_wait_max_ms"],
            "longest_wait_during": lock_during["longest_wait"],
            "status_samples": len(during),
            "status_jobs_first": sum(during[0]["jobs"].values()) if during else 0,
            "status_jobs_last": sum(during[-1]["jobs"].values()) if during else 0,
            "status_claimed_max": max(claimed_seen, default=0),
            "status_closed_while_submitting": sum(x["status"] not in ("queued", "running") for x in during),
            "claimed_before_last_chunk": claimed_before, "done_before_last_chunk": done_before,
            "jobs": jobs_n, "jobs_expected": expected_jobs, "jobs_distinct": seqs_n, "plan_jobs_distinct": res["distinct_jobs"],
            "messages_sent": sum(m for _, _, m in sends),
            "problems_stored": problems_n, "searches": searches_n, "searched_problems": searched_problems,
            "closed_early": bool(batch_finished is not None and batch_finished < last_chunk_at),
            "batch_status_after": batch_status, "submitting_marker_after": marker,
            "load1": load1,
        }
    finally:
        for t in (status, locks, sched):
            if t is not None:
                t.stop_event.set()
        if sched is not None:
            sched.join(10)
        if locks is not None:
            locks.join(10)
        go.set()
        if child.is_alive():
            child.terminate()
        child.join(10)
        fleet.stop()
        store.close()
        redis_client.flushdb()  # type: ignore[attr-defined]
        admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def print_submit_during(r: dict[str, Any]) -> None:
    w = r["longest_wait_during"]
    print(f"\nsubmit during: {r['workers']} workers busy on {r['backlog_problems']} problems; {r['problems']} problems submitted "
          f"({r['jobs']} jobs of {r['chunk']}, {r['rows_per_txn']} problems per transaction, priority {r['priority']})\n"
          f"  submission: {r['submit_s']:.1f}s wall, {r['chunks']} chunks, chunk write median {r['chunk_write_median_ms']:.0f} ms "
          f"max {r['chunk_write_max_ms']:.0f} ms, enqueue median {r['enqueue_median_ms']:.0f} ms; {r['rows_s']:.0f} rows/s "
          f"({r['problems_s']:.0f} problems/s); first jobs enqueued after {r['first_enqueue_s']:.2f}s\n"
          f"  claims before ({r['before_window_s']:.0f}s): {r['claims_before']:.0f}, p50 {r['claim_before_p50_ms']:.1f} ms "
          f"p99 {r['claim_before_p99_ms']:.1f} ms mean {r['claim_before_mean_ms']:.1f} ms; during: {r['claims_during']:.0f}, "
          f"p50 {r['claim_during_p50_ms']:.1f} ms p99 {r['claim_during_p99_ms']:.1f} ms mean {r['claim_during_mean_ms']:.1f} ms\n"
          f"  lock waits (sampled every {r['lock_sample_ms']:.0f} ms, {r['lock_samples_before']} / {r['lock_samples_during']} samples): "
          f"claims max {r['claim_lock_wait_max_ms_before']:.0f} ms before, {r['claim_lock_wait_max_ms_during']:.0f} ms during "
          f"({r['claim_lock_waits_during']} claim waits); any statement max {r['any_lock_wait_max_ms_before']:.0f} / "
          f"{r['any_lock_wait_max_ms_during']:.0f} ms ({r['lock_waits_before']} / {r['lock_waits_during']} waits)"
          + (f"; longest: {w['query']!r} on {w['event']}, blocked by {w['blocker']!r}" if w else "") + "\n"
          f"  progress: status showed the batch {r['status_samples']} times while it was written, jobs {r['status_jobs_first']} -> "
          f"{r['status_jobs_last']}, up to {r['status_claimed_max']} claimed; {r['claimed_before_last_chunk']} jobs claimed and "
          f"{r['done_before_last_chunk']} done before the last chunk's transaction began\n"
          f"  integrity: jobs {r['jobs']} of {r['jobs_expected']} ({r['jobs_distinct']} distinct), messages sent {r['messages_sent']}, "
          f"problems {r['problems_stored']} of {r['problems']}, searches {r['searches']} over {r['searched_problems']} problems; "
          f"closed early: {'yes' if r['closed_early'] or r['status_closed_while_submitting'] else 'no'} "
          f"(status after: {r['batch_status_after']}, submitting marker {'still set' if r['submitting_marker_after'] else 'cleared'}); "
          f"load1 {r['load1']:.1f}", flush=True)
    print("submit_during: " + json.dumps(r, default=str), flush=True)


COLUMNS = [
    ("problems_s", "probl/s", "{:.2f}"), ("nodes_s", "nodes/s", "{:.0f}"), ("tokens_s", "tok/s", "{:.0f}"),
    ("claim_p50_ms", "claim_p50", "{:.1f}ms"), ("claim_p99_ms", "claim_p99", "{:.1f}ms"),
    ("write_p50_ms", "write_p50", "{:.1f}ms"), ("write_p99_ms", "write_p99", "{:.1f}ms"),
    ("renewals_s", "renew/s", "{:.2f}"), ("pg_conn_max", "pg_conn_max", "{:.0f}"), ("pg_conn_mean", "mean", "{:.1f}"),
    ("writes_per_node", "rows/node", "{:.2f}"), ("bytes_per_node", "B/node", "{:.0f}"), ("wal_per_node", "WAL_B/node", "{:.0f}"),
    ("worker_cpu_ms_node", "wkr_cpu/node", "{:.2f}ms"), ("pg_cpu_ms_node", "pg_cpu/node", "{:.2f}ms"),
    ("tick_p50_ms", "tick_p50", "{:.0f}ms"), ("tick_max_ms", "tick_max", "{:.0f}ms"), ("redis_mb", "redis", "{:.1f}MB"),
    ("rss_mb", "RSS/wkr", "{:.0f}MB"), ("startup_s", "startup", "{:.0f}s"), ("submit_s", "submit", "{:.1f}s"),
    ("claims_during_submit", "claims_in_submit", "{:.0f}"), ("claim_sub_p99_ms", "their_p99", "{:.1f}ms"),
    ("killed", "killed", "{}"), ("requeued", "requeued", "{}"), ("dup_nodes", "dup_nodes", "{}"), ("load1", "load1", "{:.1f}"),
]


def print_table(rows: list[Row]) -> None:
    head = ["workers"] + [c[1] for c in COLUMNS]
    cells = [[r.label] + [fmt.format(r.values[k]) for k, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)), flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(f"signal {s}")))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16,64", help="fleet sizes (worker processes), comma-separated")
    ap.add_argument("--problems", type=int, default=40_000, help="problems submitted per size, over --batches batches")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=8, help="problems per job")
    ap.add_argument("--round-s", type=float, default=0.5, help="seconds one generate step of the scripted model takes")
    ap.add_argument("--window", type=float, default=60.0, help="seconds measured per size")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds after submission before measuring")
    ap.add_argument("--kill-sizes", default="16", help="sizes run again with a worker SIGKILLed every --kill-every s ('' for none)")
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--slow-factor", type=float, default=10.0, help="hostage run: one of 16 workers this much slower (0: skip)")
    ap.add_argument("--hostage-workers", type=int, default=16)
    ap.add_argument("--pool-size", type=int, default=None, help="$MARCO_DB_POOL_SIZE for the workers (default: theirs)")
    ap.add_argument("--max-overflow", type=int, default=None, help="$MARCO_DB_MAX_OVERFLOW for the workers")
    ap.add_argument("--base-port", type=int, default=19300)
    ap.add_argument("--lease", type=int, default=LEASE_S, help="job lease in seconds (renewed every third of it)")
    ap.add_argument("--submit-during", type=int, default=0, metavar="N",
                    help="instead of the size loop: submit one batch of N problems while each fleet size is busy (see above)")
    ap.add_argument("--submit-chunk", type=int, default=8, help="problems per job of that batch (marco submit's default)")
    ap.add_argument("--submit-rows-per-txn", type=int, default=SUBMIT_ROWS_PER_TXN, help="problems per transaction of that batch")
    ap.add_argument("--submit-priority", type=int, default=5, help="its priority (the backlog's is 0)")
    ap.add_argument("--submit-timeout", type=float, default=1800.0, help="seconds the submission may take")
    ap.add_argument("--lock-sample-ms", type=float, default=50.0, help="pg_stat_activity lock-wait sampling interval")
    ap.add_argument("--status-every", type=float, default=0.5, help="seconds between status snapshots of the batch being submitted")
    args = ap.parse_args()
    globals()["LEASE_S"] = args.lease

    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    kill_sizes = [int(x) for x in args.kill_sizes.split(",") if x.strip()]
    print(f"fleet bench: sizes {sizes}, {args.problems} problems in {args.batches} batches per size, chunk {args.chunk}, "
          f"round {args.round_s}s, window {args.window:.0f}s, lease {LEASE_S}s, worker pool {'default 1+4' if args.pool_size is None and args.max_overflow is None else f'{args.pool_size}+{args.max_overflow}'}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}", flush=True)
    if args.submit_during:
        results = []
        for n in sizes:
            results.append(run_submit_during(args, n, args.base_port))
            print_submit_during(results[-1])
        for r in results[:-1]:
            print(f"claim p99 ratio at {r['workers']} workers: {r['claim_p99_ratio']:.3f}")
        print(f"submit_during_claim_p99_ratio: {results[-1]['claim_p99_ratio']:.3f}")
        return
    rows: list[Row] = []
    for n in sizes:
        rows.append(run_size(args, n, 0.0, args.base_port))
        print_table(rows[-1:] if len(rows) > 1 else rows)
    for n in kill_sizes:
        rows.append(run_size(args, n, args.kill_every, args.base_port))
    print("\nall sizes (window %.0fs each):" % args.window)
    print_table(rows)
    if args.slow_factor:
        h = run_hostage(args, args.hostage_workers, args.base_port)
        print(f"\nhostage: {h['workers']} workers, worker 0 {args.slow_factor:.0f}x slower, {h['jobs']} jobs: batch {h['batch_s']:.1f}s; "
              f"job p50 {h['job_p50_s']:.1f}s p99 {h['job_p99_s']:.1f}s max {h['job_max_s']:.1f}s; slow worker ran {h['slow_jobs']} "
              f"job(s) (mean {h['slow_job_mean_s']:.1f}s vs {h['fast_job_mean_s']:.1f}s); batch tail after the last fast job "
              f"{h['tail_after_others_s']:.1f}s; jobs run twice {h['retried']}, not done {h['not_done']}")
    by = {r.workers: r.values["problems_s"] for r in rows if "+kill" not in r.label}
    if 1 in by and by[1] > 0:
        biggest = 16 if 16 in by else max(by)
        eff = by[biggest] / (biggest * by[1])
        if biggest != 16:
            print(f"(no 16-worker run: efficiency at {biggest} workers)")
        print(f"fleet_scaling_efficiency_16: {eff:.3f}")


if __name__ == "__main__":
    main()
