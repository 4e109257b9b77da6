"""Thin tasks: a message carries a job id; the job itself (and its results) live in the store.

The same :func:`run_job` runs inside a Celery worker and, with no broker configured, in the submitting
process. Running a job twice is safe: the store's lease lets one runner at a time hold it, and the job
library resumes from the nodes already stored and writes nothing twice.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from celery import Celery, Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutting_down
from celery.utils.log import get_logger

from marco.shutdown import SHUTDOWN
from marco.store.urls import one_line
from worker import runtime as _runtime
from worker.settings import TASK_FOR_KIND, QueueSettings

log = get_logger("marco.worker")  # under Celery's logger, so it reaches the worker's log

PRELOAD_ENV = "MARCO_PRELOAD_MODELS"  # comma-separated model specs each pool process loads at start

JobRunner = Callable[[_runtime.WorkerRuntime, str], Any]

# Job kinds with a runner of their own; every other kind goes to `marco.jobs.execute_job`, which knows
# reasoning jobs (and, with issue 5, synthesis and training jobs).
RUNNERS: dict[str, JobRunner] = {}


def runner(kind: str) -> Callable[[JobRunner], JobRunner]:
    """Register the runner of jobs of ``kind``."""

    def wrap(fn: JobRunner) -> JobRunner:
        RUNNERS[kind] = fn
        return fn

    return wrap


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors worth a retry with backoff: the database or the broker went away for a moment."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import InterfaceError, OperationalError

    return (OperationalError, InterfaceError, BrokerError, RedisConnectionError, RedisTimeoutError, ConnectionError)


def is_transient(exc: BaseException) -> bool:
    """A database or broker error worth a retry (see :func:`marco.store.db.is_transient`)."""
    from marco.store.db import is_transient as db_transient

    return isinstance(exc, transient_errors()) or db_transient(exc)


class TransientError(Exception):
    """What a retried task reports (its cause's first line, passwords masked)."""


class JobFailed(Exception):
    """Raised by the Celery task when its job ended ``failed``, so the task's state (FAILURE) says so."""


def _default_runner(rt: _runtime.WorkerRuntime, job_id: str, reclaim: bool = False) -> Any:
    from marco.jobs import execute_job

    outcome = execute_job(
        rt.store, job_id, rt.backends, rt.name, lease_s=rt.settings.lease_s, reclaim=reclaim,
        token=rt.claims.get(job_id) if reclaim else None,
        on_claim=lambda claim: rt.claims.__setitem__(job_id, claim.token),
        progress_timeout_s=rt.settings.progress_timeout_s,
    )  # fmt: skip
    rt.claims.pop(job_id, None)  # ended one way or another: no retry will reclaim it
    return outcome


def run_job(job_id: str, rt: _runtime.WorkerRuntime | None = None, reclaim: bool = False) -> dict[str, Any]:
    """Run one job by id and return a JSON-able summary (the store holds the real outcome).

    ``reclaim``: this is a retry after a transient error, the job may still be held by this worker."""
    from marco.store import StoreError

    rt = rt or _runtime.current()
    store = rt.store  # outside the try: an unreachable or too new database is not a missing job
    try:
        kind = store.get_job(job_id).kind
    except StoreError:
        # Its batch was deleted (a submit that could not enqueue everything): nothing to do, drop it.
        log.warning("job %s is not in the store; message dropped", job_id)
        return {"job_id": job_id, "status": "missing"}
    run = RUNNERS.get(kind)
    started = time.perf_counter()
    try:
        outcome = run(rt, job_id) if run is not None else _default_runner(rt, job_id, reclaim=reclaim)
    except SoftTimeLimitExceeded:
        reason = f"soft time limit exceeded ({rt.settings.soft_time_limit_s}s); raise $MARCO_TASK_SOFT_LIMIT"
        rt.store.fail_job(job_id, reason, worker=rt.name, token=rt.claims.pop(job_id, None))
        log.warning("job %s stopped: %s", job_id, reason)
        return {"job_id": job_id, "status": "failed", "error": reason}
    summary = {"job_id": job_id, "kind": kind, "worker": rt.name, "elapsed_s": time.perf_counter() - started}
    status = getattr(outcome, "status", None)
    if status is not None:
        summary["status"] = status
    if getattr(outcome, "error", None):
        summary["error"] = outcome.error
    return summary


def task_result(summary: dict[str, Any]) -> dict[str, Any]:
    """Make the Celery task end as its job did: SUCCESS (done), FAILURE (failed), REJECTED (cancelled;
    released on shutdown, which puts the message back for another worker), IGNORED (lost, skipped,
    missing: another delivery or worker owns the outcome)."""
    status = summary.get("status")
    if status == "failed":
        raise JobFailed(summary.get("error") or "job failed")
    if status == "cancelled":
        raise Reject(summary.get("error") or "job cancelled", requeue=False)
    if status == "released":
        raise Reject(summary.get("error") or "worker shutting down", requeue=True)
    if status in ("lost", "skipped", "missing"):
        raise Ignore()
    return summary


def retry_countdown(retries: int, backoff_max_s: float) -> float:
    """Exponential back-off with full jitter: 2, 4, 8 ... seconds, at most ``backoff_max_s``."""
    return random.uniform(0.5, 1.0) * min(backoff_max_s, 2.0 * 2**retries)


@runner("sleep")
def _sleep_job(rt: _runtime.WorkerRuntime, job_id: str) -> Any:
    """Hold the lease, wait ``payload["seconds"]``, finish: a job whose cost is pure waiting."""
    store = rt.store
    job = store.claim_job(job_id, rt.name, rt.settings.lease_s)
    if job is None:
        return None
    time.sleep(float(job.payload.get("seconds", 0.0)))
    store.finish_job(job_id, rt.name, token=job.token)
    return job


def register_tasks(app: Celery) -> dict[str, Task]:
    """Define the ``marco.*`` tasks on ``app`` (one per queue, plus ``marco.sleep``)."""
    settings: QueueSettings = app.conf.marco_settings
    tasks: dict[str, Task] = {}
    for name in sorted(set(TASK_FOR_KIND.values())):

        def body(self: Task, job_id: str) -> dict[str, Any]:
            rt = _runtime.current(settings, name=f"{self.request.hostname}:{os.getpid()}")
            _watch_sigterm()
            try:
                summary = run_job(job_id, rt, reclaim=self.request.retries > 0)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # The database or broker went away: the job was not ended in the store, so the message must
                # come back. Past max_retries the task fails, its lease expires and the scheduler re-sends it.
                reason = f"{type(exc).__name__}: {one_line(exc)}"
                log.warning("job %s: transient error, retry %d: %s", job_id, self.request.retries + 1, reason)
                # the retry's reason reaches the broker and Flower's task view: the masked line, not `exc`
                raise self.retry(exc=TransientError(reason), countdown=retry_countdown(self.request.retries, settings.retry_backoff_max_s))
            return task_result(summary)

        tasks[name] = app.task(
            body,
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            # the body retries transient errors itself (is_transient also knows invalidated connections);
            # Celery's autoretry stays as the net for any raised past it, with the same back-off
            autoretry_for=transient_errors(),
            retry_backoff=2,
            retry_backoff_max=settings.retry_backoff_max_s,
            retry_jitter=True,
            max_retries=settings.max_retries,
            soft_time_limit=settings.soft_time_limit_s,
            time_limit=settings.hard_time_limit_s,
            ignore_result=True,
            shared=False,  # each app gets its own tasks with its own limits
        )
    return tasks


def _request_shutdown(signum: int, _frame: Any) -> None:
    """SIGTERM in a pool process: finish the current round, hand the job back, then exit (warm shutdown).
    A SIGTERM arriving again after 10 s (a cold shutdown) ends the process at once."""
    global _shutdown_at
    if SHUTDOWN.is_set() and time.monotonic() - _shutdown_at > 10.0:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if not SHUTDOWN.is_set():
        _shutdown_at = time.monotonic()
        SHUTDOWN.set()


_shutdown_at = 0.0


def _serve_metrics(offset: int = 0) -> None:
    """Serve this process's ``marco_*`` metrics on ``$MARCO_METRICS_PORT`` + ``offset`` when it is set."""
    from marco import metrics

    try:
        port = metrics.serve_from_env(offset)
    except ValueError as exc:
        log.warning("metrics not served: %s", exc)
        return
    if port is not None:
        log.info("metrics on port %d (pid %d)", port, os.getpid())


@worker_init.connect
def _serve_metrics_in_main(sender: Any = None, **_: Any) -> None:
    # solo and threads pools run jobs in the main process: it serves. A prefork main process runs no job;
    # each pool process serves instead, on the base port plus its index (see _fresh_process).
    pool = getattr(sender, "pool_cls", "")
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if "solo" in name or "thread" in name:
        _serve_metrics()


@worker_init.connect
def _require_database(**_: Any) -> None:
    # Without $MARCO_DATABASE_URL a worker would open ./marco.db, find none of the jobs it is sent and drop
    # every message as missing: refuse to start instead. Refuse too when the database's schema is newer
    # than this code (an old worker must not write rows it does not understand).
    if not os.environ.get("MARCO_DATABASE_URL"):
        message = "error: MARCO_DATABASE_URL is not set; a worker must use the store the jobs were submitted to " \
                  "(e.g. MARCO_DATABASE_URL=postgresql://HOST/marco)"
        _refuse(message)
    from marco.store.migrate import SchemaTooNew, check_not_newer

    try:
        from marco.store.db import check_connection, make_engine

        engine = make_engine(os.environ["MARCO_DATABASE_URL"])
        try:
            check_connection(engine)
            check_not_newer(engine)
        finally:
            engine.dispose()
    except SchemaTooNew as exc:
        _refuse(f"error: {exc}")
    except Exception as exc:  # unreachable now: start anyway, jobs retry until it answers
        log.warning("store not checked at start: %s", one_line(exc))


def _refuse(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    log.critical(message)
    os._exit(78)  # EX_CONFIG; raising here would only be logged by the signal dispatcher


@worker_shutting_down.connect
def _forward_shutdown(how: str = "Warm", **_: Any) -> None:
    # The main process got SIGTERM (docker stop, systemd): tell running jobs to stop after their round.
    if how != "Warm":
        return
    SHUTDOWN.set()  # solo/threads pools run jobs in this process
    for path in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in path.read_text().split():
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    # A pool process must not reuse the parent's connections (and the parent never loaded a model).
    _runtime.reset()
    from billiard.process import current_process

    # Pool process k (0-based, kept by its replacement) serves on $MARCO_METRICS_PORT + k.
    _serve_metrics(int(getattr(current_process(), "index", 0) or 0))
    specs = [s.strip() for s in os.environ.get(PRELOAD_ENV, "").split(",") if s.strip()]
    if specs:
        started = time.perf_counter()
        _runtime.current().preload(specs)
        log.info("loaded %s in %.1fs", ", ".join(specs), time.perf_counter() - started)


def _watch_sigterm() -> None:
    """In a prefork pool process, take SIGTERM over from billiard (which would kill the process mid-query)
    the first time the process runs a task: billiard installs its handlers after worker_process_init."""
    from billiard.process import current_process

    if current_process().name == "MainProcess" or threading.current_thread() is not threading.main_thread():
        return  # solo/threads pools: Celery's own handler runs, and _forward_shutdown sets the flag
    if signal.getsignal(signal.SIGTERM) is not _request_shutdown:
        signal.signal(signal.SIGTERM, _request_shutdown)


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    _runtime.reset()
