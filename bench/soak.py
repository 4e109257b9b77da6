"""Soak: a large scripted batch on real workers while the queue's parts fail, against an undisturbed run.

    PYTHONPATH=. .venv/bin/python bench/soak.py [--problems 2000] [--workers 3] [--kill-every 20]

Needs the local Postgres (``$MARCO_BENCH_PG_ADMIN``, default postgres@127.0.0.1:5432) and Redis
(``$MARCO_BENCH_REDIS``). It creates a scratch database and claims a free Redis database number, and
removes them at the end; the shared servers are never stopped, flushed or reconfigured.

Workers (``--workers`` real ``celery worker`` processes) and a real ``marco scheduler`` reach Postgres
through a TCP proxy this script runs, so "the database refuses connections" is the proxy closing its
port and cutting every open connection. The same scripted MCTS batch (``--problems`` problems, ``--chunk``
per job; the scripted model waits ``--round-s`` per generation round, as a real one computes) runs twice,
with the same batch id (the search seeds derive from it) in two scratch databases, each time on freshly
started workers and scheduler:

1. undisturbed: the reference answers and throughput;
2. disturbed: a worker SIGKILLed (whole process group) every ``--kill-every`` seconds (the first one
   already once 10% of the jobs have ended) and restarted; once
   ``--flush-at`` of the jobs have ended, the Redis database is flushed (every queued and unacknowledged
   message is lost); once ``--cut-at`` have ended, Postgres refuses connections for ``--cut-for`` seconds.
   The faults are tied to progress, so a short run still gets every one of them mid-batch.

The disturbed run ends when its batch ends, or when no job has ended for ``--stall`` seconds after the last
fault (a stranded job never ends on its own), or after ``--timeout``. It prints jobs lost (not ``done``,
by status and reason), duplicate nodes (two stored nodes at one tree position or one sequence number of a
search), answers that differ from the undisturbed run, double runs (every node carries its run's marker,
the claim's fencing token: nodes of one search written out of claim order mean two runs of its job wrote
at once), the throughput kept, and last ``soak_jobs_lost_or_wrong: N``: jobs lost, or done with a duplicate
node, a double run or an answer that differs (goal 0).
Timings are wall clock on whatever else runs on the machine: compare the two runs of one invocation.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, make_url, select, text  # noqa: E402

from marco.search.base import SearchConfig  # noqa: E402
from marco.store import Store  # noqa: E402
from marco.store.models import Job, NodeRow, ProblemRow, Search  # noqa: E402
from marco.tasks.base import Problem  # noqa: E402
from scheduler.dispatch import CeleryDispatcher  # noqa: E402
from worker.harness import Proc, start_worker  # noqa: E402
from worker.settings import QueueSettings  # noqa: E402

PG_ADMIN = os.environ.get("MARCO_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("MARCO_BENCH_REDIS", "redis://127.0.0.1:6379")
CLAIM_KEY = "marco:soak"
ENDED = ("done", "failed", "cancelled")


# --- a TCP proxy that can refuse connections ----------------------------------------------------------------
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target`` from one thread; :meth:`cut` closes the port and resets every
    open connection (clients get "connection refused"), :meth:`restore` opens it again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._listener: socket.socket | None = None
        self.port = self._listen(0)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._commands: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="pg-proxy", daemon=True)
        self._thread.start()

    def _listen(self, port: int) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self._sel.register(sock, selectors.EVENT_READ, "accept")
        return sock.getsockname()[1]

    def _command(self, name: str) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((name, done))
        self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError(f"proxy did not {name}")

    def cut(self) -> None:
        self._command("cut")

    def restore(self) -> None:
        self._command("restore")

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)

    def _drop(self, sock: socket.socket, reset: bool = False) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            if reset:  # RST instead of FIN: the client sees its connection broken, as when a server dies
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _run_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for name, done in commands:
            if name == "cut" and self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
                for sock in list(self._peers):
                    if sock in self._peers:
                        self._drop(sock, reset=True)
            elif name == "restore" and self._listener is None:
                self._listen(self.port)
            done.set()

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.5):
                if key.data == "wake":
                    self._wake_r.recv(64)
                    self._run_commands()
                elif key.data == "accept" and self._listener is not None:
                    try:
                        client, _ = self._listener.accept()
                    except OSError:
                        continue
                    try:
                        upstream = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setblocking(True)
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self._peers[client], self._peers[upstream] = upstream, client
                    self._sel.register(client, selectors.EVENT_READ, "data")
                    self._sel.register(upstream, selectors.EVENT_READ, "data")
                elif key.data == "data":
                    sock = key.fileobj
                    peer = self._peers.get(sock)  # type: ignore[arg-type]
                    if peer is None:
                        continue
                    try:
                        chunk = sock.recv(65536)  # type: ignore[union-attr]
                        if chunk:
                            peer.sendall(chunk)
                            continue
                    except OSError:
                        pass
                    self._drop(sock)  # type: ignore[arg-type]
        for sock in list(self._peers):
            if sock in self._peers:
                self._drop(sock)
        if self._listener is not None:
            self._listener.close()


# --- scratch resources -----------------------------------------------------------------------------------------
def admin(sql: str) -> None:
    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def claim_redis_db() -> tuple[str, object]:
    import redis

    token = uuid.uuid4().hex
    for n in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS}/{n}")
        if client.dbsize() == 0 and client.set(CLAIM_KEY, token, nx=True):
            return f"{REDIS}/{n}", client
    raise SystemExit("no free Redis database number (1-15)")


def flush_own_db(client) -> None:  # noqa: ANN001
    """FLUSHDB of our database number and the claim key back, atomically, so no one else sees it empty."""
    pipe = client.pipeline(transaction=True)
    pipe.flushdb()
    pipe.set(CLAIM_KEY, "soak")
    pipe.execute()


# --- the cluster under test ------------------------------------------------------------------------------------
@dataclass
class Cluster:
    env: dict[str, str]
    log_dir: Path
    n_workers: int
    scheduler_interval: float
    workers: dict[str, Proc] = field(default_factory=dict)
    scheduler: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        for i in range(1, self.n_workers + 1):
            self.workers[f"soak{i}"] = start_worker(self.env, self.log_dir, name=f"soak{i}", queues="reason")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / "scheduler.log", "ab")
        self.scheduler = subprocess.Popen(
            [sys.executable, "-c", "from marco.cli import main; main()", "scheduler", "--interval", str(self.scheduler_interval)],
            cwd=ROOT, env={**os.environ, **self.env, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill_and_restart(self, name: str) -> None:
        self.workers[name].kill(signal.SIGKILL)
        self.workers[name].popen.wait(10)
        self.restarts += 1
        log = self.workers[name].log  # the restarted worker writes a fresh log under the same name
        log.rename(log.with_name(f"{log.stem}.{self.restarts}.killed.log"))
        self.workers[name] = start_worker(self.env, self.log_dir, name=name, queues="reason", ready_timeout_s=120)

    def stop(self) -> None:
        for proc in self.workers.values():
            proc.stop()
        if self.scheduler is not None and self.scheduler.poll() is None:
            os.killpg(self.scheduler.pid, signal.SIGTERM)
            try:
                self.scheduler.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.scheduler.pid, signal.SIGKILL)


@dataclass
class Run:
    batch_id: str
    wall_s: float
    ended: str  # how the wait ended: batch status, "stalled" or "timeout"
    faults: list[str] = field(default_factory=list)


def job_counts(store: Store, batch_id: str) -> Counter[str]:
    with store.sessions() as s:
        rows = s.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
    return Counter({status: n for status, n in rows})


def problems_for(n: int) -> list[Problem]:
    # Different questions give different scripted trees and answers, so a mixed-up result shows.
    return [Problem("demo", "en", i, f"soak {i}: what is {i % 97} + {42 - i % 97}?", ("42",)) for i in range(n)]


def submit_batch(store: Store, env: dict[str, str], args: argparse.Namespace, batch_id: str) -> str:
    """The batch, written with ``batch_id`` and enqueued as ``marco submit`` does; returns the id."""
    config = SearchConfig(
        strategy="mcts", action="ministep:16", budget=args.budget, children=2, max_depth=3, max_answer_tokens=24, seed=1
    )
    model = f"scripted:round={args.round_s:g}" if args.round_s > 0 else "scripted"
    plan = store.create_batch(
        problems_for(args.problems), [config], kind="reason", name="soak", model=model, task="demo",
        chunk_size=args.chunk, batch_id=batch_id,
    )
    CeleryDispatcher(QueueSettings.from_env(env)).enqueue([(job_id, "reason") for job_id in plan.job_ids])
    return plan.batch_id


def run_undisturbed(store: Store, cluster: Cluster, args: argparse.Namespace, batch_id: str) -> Run:
    t0 = time.monotonic()
    submit_batch(store, cluster.env, args, batch_id)
    while (status := store.get_batch(batch_id).status) in ("queued", "running"):
        if time.monotonic() - t0 > args.timeout:
            return Run(batch_id, time.monotonic() - t0, "timeout")
        time.sleep(0.5)
    return Run(batch_id, time.monotonic() - t0, status)


def run_disturbed(
    store: Store, cluster: Cluster, proxy: TcpProxy, redis_client, args: argparse.Namespace, batch_id: str  # noqa: ANN001
) -> Run:
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    submit_batch(store, cluster.env, args, batch_id)
    run = Run(batch_id, 0.0, "")

    def note(what: str) -> None:
        line = f"  [{time.monotonic() - t0:6.1f}s] {what}"
        run.faults.append(line.strip())
        print(line, flush=True)

    faults = set(args.faults.split(","))
    flushed, cut_done = "flush" not in faults, "cut" not in faults
    cut_until: float | None = None
    next_kill = t0 + args.kill_every if "kill" in faults else float("inf")
    last_event = t0  # the last job that ended, or the end of a flush or cut (kills come too often to count)
    last_ended = -1
    killed = 0
    while True:
        now = time.monotonic()
        counts = job_counts(store, batch_id)
        total = sum(counts.values())
        ended = sum(counts[s] for s in ENDED)
        if ended != last_ended:
            last_ended, last_event = ended, max(last_event, now)
        status = store.get_batch(batch_id).status
        if status not in ("queued", "running") and cut_until is None:
            run.ended = status
            break
        if now - t0 > args.timeout:
            run.ended = "timeout"
            break
        if cut_until is None and now - last_event > args.stall:
            run.ended = f"stalled ({ended}/{total} jobs ended, none for {args.stall:.0f}s)"
            break

        if cut_until is not None and now >= cut_until:
            proxy.restore()
            cut_until, cut_done, last_event = None, True, now
            note("Postgres accepts connections again")
        elif not flushed and ended >= args.flush_at * total:
            flush_own_db(redis_client)
            flushed, last_event = True, now
            note(f"Redis FLUSHDB ({ended}/{total} jobs ended: every queued message lost)")
        elif flushed and not cut_done and cut_until is None and ended >= args.cut_at * total:
            proxy.cut()
            cut_until = now + args.cut_for
            note(f"Postgres refuses connections for {args.cut_for:.0f}s ({ended}/{total} jobs ended)")
        elif (now >= next_kill or (next_kill < float("inf") and not killed and ended >= 0.1 * total)) \
                and cut_until is None and status in ("queued", "running"):
            name = rng.choice(sorted(cluster.workers))
            note(f"SIGKILL {name} (pid {cluster.workers[name].pid}) and restart it")
            cluster.kill_and_restart(name)
            killed += 1
            next_kill = time.monotonic() + args.kill_every
        time.sleep(0.5)
    run.wall_s = time.monotonic() - t0
    return run


# --- what the store says -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    jobs: Counter[str]
    lost: dict[str, str]  # job id -> status and reason, for every job not done
    duplicates: dict[str, int]  # job id -> extra nodes at a taken position or sequence number
    differ: dict[str, list[str]]  # job id -> problems whose answer differs from the reference
    answers: dict[tuple[str, int], str | None]
    problems_done: int
    double_runs: dict[str, int] = field(default_factory=dict)  # job id -> nodes written out of claim order

    @property
    def lost_or_wrong(self) -> set[str]:
        return set(self.lost) | set(self.duplicates) | set(self.differ) | set(self.double_runs)


def run_markers(store: Store, batch_id: str) -> dict[str, int]:
    """Two runs of one job at once, seen in what they wrote: every node carries its run's marker (the claim's
    fencing token, ``nodes.claim``). One run after another (a resume) writes a search's nodes in claim
    order; a node written with no marker, or after a node of a later claim (by ``seq``), is a double run
    (node ids are deterministic and scripted answers identical, so nothing else shows it).
    Returns ``{job_id: nodes out of order}``."""
    previous = func.lag(NodeRow.claim).over(partition_by=NodeRow.search_id, order_by=NodeRow.seq)
    with store.sessions() as s:
        ordered = (
            select(Search.job_id.label("job_id"), NodeRow.claim.label("claim"), previous.label("previous"))
            .select_from(NodeRow).join(Search, Search.id == NodeRow.search_id).where(Search.batch_id == batch_id)
            .subquery()
        )
        rows = s.execute(
            select(ordered.c.job_id, func.count()).where(
                (ordered.c.claim.is_(None)) | (ordered.c.previous > ordered.c.claim)
            ).group_by(ordered.c.job_id)
        ).all()
    return {str(job_id): int(n) for job_id, n in rows}


def outcome(store: Store, batch_id: str, reference: dict[tuple[str, int], str | None] | None) -> Outcome:
    with store.sessions() as s:
        jobs = s.execute(select(Job.id, Job.status, Job.error, Job.attempts).where(Job.batch_id == batch_id)).all()
        searches = s.execute(
            select(Search.id, Search.job_id, Search.status, Search.final_answer, ProblemRow.lang, ProblemRow.index)
            .join(ProblemRow, ProblemRow.id == Search.problem_id).where(Search.batch_id == batch_id)
        ).all()
        position_dups = s.execute(
            select(Search.job_id, func.count())
            .select_from(NodeRow).join(Search, Search.id == NodeRow.search_id).where(Search.batch_id == batch_id)
            .group_by(Search.job_id, NodeRow.search_id, NodeRow.parent_id, NodeRow.sibling_index).having(func.count() > 1)
        ).all()
        seq_dups = s.execute(
            select(Search.job_id, func.count())
            .select_from(NodeRow).join(Search, Search.id == NodeRow.search_id).where(Search.batch_id == batch_id)
            .group_by(Search.job_id, NodeRow.search_id, NodeRow.seq).having(func.count() > 1)
        ).all()
    duplicates: Counter[str] = Counter()
    for job_id, n in [*position_dups, *seq_dups]:
        duplicates[str(job_id)] += n - 1
    lost = {str(j.id): f"{j.status} after {j.attempts} attempt(s): {j.error.splitlines()[0][:200] if j.error else '-'}"
            for j in jobs if j.status != "done"}
    answers = {(r.lang, r.index): r.final_answer for r in searches}
    differ: dict[str, list[str]] = {}
    if reference is not None:
        for r in searches:
            if str(r.job_id) in lost:
                continue
            if r.final_answer != reference.get((r.lang, r.index)):
                differ.setdefault(str(r.job_id), []).append(
                    f"{r.lang}/{r.index}: {r.final_answer!r} (undisturbed {reference.get((r.lang, r.index))!r})")
    done = sum(1 for r in searches if r.status == "done")
    return Outcome(Counter(j.status for j in jobs), lost, dict(duplicates), differ, answers, done, run_markers(store, batch_id))


def _terminate(signum, frame) -> None:  # noqa: ANN001
    raise SystemExit(f"stopped by signal {signum}")  # so `finally` stops the processes and drops the database


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=2000, help="problems in the batch (one MCTS search each)")
    ap.add_argument("--chunk", type=int, default=10, help="problems per job")
    ap.add_argument("--budget", type=int, default=384, help="MCTS token budget per search (scripted backend)")
    ap.add_argument("--round-s", type=float, default=0.2,
                    help="seconds each generation round of the scripted model waits, as a real model would (0: none)")
    ap.add_argument("--workers", type=int, default=3, help="worker processes (one pool process each)")
    ap.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker SIGKILLs")
    ap.add_argument("--flush-at", type=float, default=0.2, help="flush Redis once this share of jobs has ended")
    ap.add_argument("--cut-at", type=float, default=0.45, help="cut Postgres once this share of jobs has ended")
    ap.add_argument("--cut-for", type=float, default=25.0, help="seconds Postgres refuses connections")
    ap.add_argument("--lease", type=int, default=10, help="MARCO_LEASE_SECONDS of the workers")
    ap.add_argument("--scheduler-interval", type=float, default=2.0)
    ap.add_argument("--stale-queued", type=float, default=20.0,
                    help="MARCO_STALE_QUEUED_SECONDS of the scheduler: re-send a job queued this long and never claimed")
    ap.add_argument("--stall", type=float, default=180.0, help="give up once no job ended for this long after the last fault")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up on a run after this many seconds")
    ap.add_argument("--seed", type=int, default=0, help="which worker gets killed when")
    ap.add_argument("--faults", default="kill,flush,cut", help="which faults to inject (comma-separated subset)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for workers and scheduler")
    ap.add_argument("--keep-logs", action="store_true", help="keep the worker and scheduler logs (their folder is printed)")
    args = ap.parse_args()
    if not (0 < args.flush_at < args.cut_at < 1):
        ap.error("need 0 < --flush-at < --cut-at < 1")
    if not set(args.faults.split(",")) <= {"kill", "flush", "cut"}:
        ap.error("--faults takes kill, flush and/or cut")

    db_base = f"marco_soak_{uuid.uuid4().hex[:10]}"
    db_names = {"undisturbed": f"{db_base}_ref", "disturbed": db_base}
    for name in db_names.values():
        admin(f'CREATE DATABASE "{name}"')
    broker, redis_client = claim_redis_db()
    target = make_url(PG_ADMIN)
    proxy = TcpProxy((target.host or "127.0.0.1", target.port or 5432))
    stores: dict[str, Store] = {}
    clusters: list[Cluster] = []
    log_dir = Path(tempfile.mkdtemp(prefix="marco-soak-"))
    batch_id = str(uuid.uuid4())
    clean = False

    def cluster_for(run: str) -> Cluster:
        """Fresh workers and scheduler on the run's database, reached through the proxy."""
        proxied = target.set(port=proxy.port, database=db_names[run]).render_as_string(hide_password=False)
        env = {
            "MARCO_BROKER_URL": broker,
            "MARCO_DATABASE_URL": proxied,
            "MARCO_LEASE_SECONDS": str(args.lease),
            "MARCO_STALE_QUEUED_SECONDS": str(args.stale_queued),
            "OMP_NUM_THREADS": "1",
            **dict(kv.split("=", 1) for kv in args.env),
        }
        cluster = Cluster(env, log_dir / run, args.workers, args.scheduler_interval)
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        for run_name, name in db_names.items():
            # Migrated before any worker starts; the soak itself reads the store directly, never via the proxy.
            stores[run_name] = Store.open(PG_ADMIN.rsplit("/", 1)[0] + "/" + name)
        print(f"soak: {args.problems} problems in jobs of {args.chunk}, {args.workers} workers, lease {args.lease}s, "
              f"lost messages re-sent after {args.stale_queued:.0f}s; logs in {log_dir}", flush=True)

        print("undisturbed run…", flush=True)
        ref = run_undisturbed(stores["undisturbed"], cluster_for("undisturbed"), args, batch_id)
        clusters.pop().stop()
        ref_out = outcome(stores["undisturbed"], batch_id, None)
        print(f"  {ref.ended} in {ref.wall_s:.1f}s: jobs {dict(ref_out.jobs)}, {ref_out.problems_done / ref.wall_s:.1f} problems/s", flush=True)
        if ref.ended != "done" or ref_out.lost or ref_out.duplicates:
            raise SystemExit(f"the undisturbed run did not complete cleanly ({ref.ended}, lost {ref_out.lost}); see {log_dir}")
        flush_own_db(redis_client)  # nothing of the first run may reach the second one's workers

        print(f"disturbed run (SIGKILL every {args.kill_every:.0f}s, Redis flushed at {args.flush_at:.0%} of jobs ended, "
              f"Postgres cut for {args.cut_for:.0f}s at {args.cut_at:.0%}; asked: {args.faults})…", flush=True)
        store = stores["disturbed"]
        run = run_disturbed(store, cluster_for("disturbed"), proxy, redis_client, args, batch_id)
        out = outcome(store, batch_id, ref_out.answers)
        differing = sum(len(v) for v in out.differ.values())
        thr_ref = ref_out.problems_done / ref.wall_s
        thr = out.problems_done / run.wall_s
        print(f"  {run.ended} after {run.wall_s:.1f}s: jobs {dict(out.jobs)}")
        kills = sum("SIGKILL" in f for f in run.faults)
        print(f"faults: {kills} worker kill(s), Redis flushed {sum('FLUSHDB' in f for f in run.faults)}x, "
              f"Postgres cut {sum('refuses' in f for f in run.faults)}x")
        for why, n in Counter(out.lost.values()).most_common(10):
            print(f"  lost x{n}: {why}")
        for job_id, problems in list(out.differ.items())[:10]:
            print(f"  differs {job_id}: {'; '.join(problems[:3])}")
        not_done = ", ".join(f"{k} {v}" for k, v in sorted(out.jobs.items()) if k != "done") or "none"
        print(f"jobs lost: {len(out.lost)} of {sum(out.jobs.values())} ({not_done})")
        print(f"duplicate nodes: {sum(out.duplicates.values())} (undisturbed run: {sum(ref_out.duplicates.values())})")
        print(f"answers that differ from the undisturbed run: {differing} of {len(out.answers)} problems")
        print(f"double runs: {len(out.double_runs)} job(s) with nodes out of claim order "
              f"({sum(out.double_runs.values())} nodes; undisturbed run: {len(ref_out.double_runs)})")
        print(f"throughput: undisturbed {thr_ref:.1f} problems/s ({ref.wall_s:.1f}s), disturbed {thr:.1f} problems/s "
              f"({run.wall_s:.1f}s, {out.problems_done} done); kept {thr / thr_ref:.2f}")
        print(f"soak_jobs_lost_or_wrong: {len(out.lost_or_wrong)}", flush=True)
        clean = not out.lost_or_wrong
    finally:
        for cluster in clusters:
            cluster.stop()
        proxy.close()
        for store in stores.values():
            store.close()
        redis_client.flushdb()  # type: ignore[attr-defined]  # our own database number only
        redis_client.close()  # type: ignore[attr-defined]
        for name in db_names.values():
            admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if clean and not args.keep_logs:
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            print(f"(worker and scheduler logs kept in {log_dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
