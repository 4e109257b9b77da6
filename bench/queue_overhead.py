"""What the queue costs: the same batch in-process vs through Redis + a Celery worker + Postgres.

    PYTHONPATH=. .venv/bin/python bench/queue_overhead.py [--jobs 6] [--model smollm2]

Needs the local Postgres (``$MARCO_BENCH_PG_ADMIN``, default postgres@127.0.0.1) and Redis; creates a
scratch database and Redis db number and removes both at the end. Prints:

1. the same small batch (demo problems, greedy, tiny budget; one problem per job) run in-process and by
   one worker process: throughput of each;
2. per-job dispatch overhead: ``--zero-jobs`` jobs that do nothing, both ways, (distributed - in-process)
   wall time per job;
3. the queue's own scaling: ``--sleep-jobs`` jobs that each wait ``--sleep-s``, one worker vs two.

Last line: ``distributed_vs_inprocess_throughput: X`` (targets: X >= 0.9, overhead < 50 ms, 2 workers >= 1.8x).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text, update  # noqa: E402

from marco.search.base import SearchConfig  # noqa: E402
from marco.store import Store  # noqa: E402
from marco.store.models import Job  # noqa: E402
from marco.tasks import get_task  # noqa: E402
from marco.tasks.base import Problem  # noqa: E402
from scheduler.dispatch import CeleryDispatcher, InlineDispatcher  # noqa: E402
from scheduler.submit import SubmitRequest, submit  # noqa: E402
from worker import runtime  # noqa: E402
from worker.harness import start_worker  # noqa: E402
from worker.settings import QueueSettings  # noqa: E402

PG_ADMIN = os.environ.get("MARCO_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("MARCO_BENCH_REDIS", "redis://127.0.0.1:6379")


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
        if client.dbsize() == 0 and client.set("marco:bench", token, nx=True):
            return f"{REDIS}/{n}", client
    raise SystemExit("no free Redis database number")


def wait_done(store: Store, batch_id: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while store.get_batch(batch_id).status in ("queued", "running"):
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id} did not finish: {store.batch_progress(batch_id).to_dict()}")
        # 20 polls a second: tight polling would steal CPU from the worker on a 2-core machine
        time.sleep(0.05)


def sleep_batch(store: Store, dispatcher, n: int, seconds: float, tag: str) -> str:
    """A batch of ``n`` jobs of kind ``sleep`` (each waits ``seconds``), enqueued; returns its id."""
    problems = [Problem("demo", "en", i, f"{tag} {i}", ("0",)) for i in range(n)]
    plan = store.create_batch(problems, [SearchConfig(strategy="greedy")], model="scripted", task="demo", chunk_size=1)
    with store.sessions.begin() as s:
        for job_id in plan.job_ids:
            s.execute(update(Job).where(Job.id == job_id).values(kind="sleep", payload={"seconds": seconds}))
    dispatcher.enqueue([(j, "sleep") for j in plan.job_ids])
    return plan.batch_id


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _terminate(signum, frame) -> None:  # noqa: ANN001
    raise SystemExit(f"stopped by signal {signum}")  # so `finally` stops the workers and drops the database


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--jobs", type=int, default=4, help="demo problems (one per job) in the real batch")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2, help="runs of the real batch each way (the fastest counts)")
    ap.add_argument("--zero-jobs", type=int, default=100)
    ap.add_argument("--sleep-jobs", type=int, default=16)
    ap.add_argument("--sleep-s", type=float, default=0.5)
    args = ap.parse_args()

    db_name = f"marco_bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{db_name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + db_name
    broker, redis_client = claim_redis_db()
    env = {"MARCO_BROKER_URL": broker, "MARCO_DATABASE_URL": db_url, "MARCO_PRELOAD_MODELS": args.model, "MARCO_LEASE_SECONDS": "300"}
    workers = []
    log_dir = Path(tempfile.mkdtemp(prefix="marco-bench-"))
    try:
        store = Store.open(db_url)
        settings = QueueSettings.from_env(env)
        inline = InlineDispatcher(QueueSettings(database_url=db_url), store=store)
        celery = CeleryDispatcher(settings)
        config = SearchConfig(strategy="greedy", budget=args.budget, max_answer_tokens=args.budget)
        problems = get_task("demo").load(None, None, None)[: args.jobs]

        def batch(dispatcher, tag: str, n: int | None = None) -> str:
            # Every run is a batch of its own with the same questions and config.
            req = SubmitRequest(task="demo", configs=[config], model=args.model, chunk=1, name=f"bench-{tag}")
            plan = submit(store, dispatcher, req, problems[:n])
            wait_done(store, plan.batch_id)
            return plan.batch_id

        print(f"loading {args.model} in-process and starting one worker…", flush=True)
        runtime.current().preload([args.model])
        workers.append(start_worker(env, log_dir, name="bench1", queues="reason"))
        batch(celery, "warmup", 1)  # a first task pays for imports
        batch(inline, "warmup-inline", 1)

        # Alternate the two ways so load from elsewhere on the machine hits both alike; keep the fastest.
        t_in = t_dist = float("inf")
        for r in range(args.repeats):
            t_in = min(t_in, timed(lambda: batch(inline, f"inprocess-{r}")))
            t_dist = min(t_dist, timed(lambda: batch(celery, f"distributed-{r}")))
        thr_in, thr_dist = args.jobs / t_in, args.jobs / t_dist
        print(f"same batch ({args.jobs} jobs, {args.model}, greedy budget {args.budget}):")
        print(f"  in-process:  {t_in:7.2f}s  {thr_in:.3f} jobs/s")
        print(f"  distributed: {t_dist:7.2f}s  {thr_dist:.3f} jobs/s  (1 worker, Redis + Postgres)")

        t0 = timed(lambda: wait_done(store, sleep_batch(store, inline, args.zero_jobs, 0.0, "zero-inline")))
        t1 = timed(lambda: wait_done(store, sleep_batch(store, celery, args.zero_jobs, 0.0, "zero-dist")))
        overhead_ms = 1000 * (t1 - t0) / args.zero_jobs
        print(f"per-job dispatch overhead: {overhead_ms:.1f} ms "
              f"({args.zero_jobs} no-op jobs: {1000 * t0 / args.zero_jobs:.1f} ms/job in-process, "
              f"{1000 * t1 / args.zero_jobs:.1f} ms/job through the queue)")

        # The queue's own scaling: fresh workers that load no model, so only waiting is measured.
        for w in workers:
            w.stop()
        workers.clear()
        light = {k: v for k, v in env.items() if k != "MARCO_PRELOAD_MODELS"}
        workers.append(start_worker(light, log_dir, name="sleep1", queues="reason"))
        wait_done(store, sleep_batch(store, celery, 2, 0.0, "sleep-warmup"))
        one = timed(lambda: wait_done(store, sleep_batch(store, celery, args.sleep_jobs, args.sleep_s, "sleep-1")))
        workers.append(start_worker(light, log_dir, name="sleep2", queues="reason"))
        wait_done(store, sleep_batch(store, celery, 4, 0.0, "sleep-warmup-2"))
        two = timed(lambda: wait_done(store, sleep_batch(store, celery, args.sleep_jobs, args.sleep_s, "sleep-2")))
        print(f"waiting jobs ({args.sleep_jobs} x {args.sleep_s}s): 1 worker {one:.2f}s, 2 workers {two:.2f}s, "
              f"speed-up {one / two:.2f}x")
        store.close()
        print(f"distributed_vs_inprocess_throughput: {thr_dist / thr_in:.3f}")
    finally:
        for w in workers:
            w.stop()
        runtime.reset()
        redis_client.flushdb()  # type: ignore[attr-defined]
        admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
