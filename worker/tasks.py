"""Thin tasks: a message carries a job id; the job itself (and its results) live in the store.

The same :func:`run_job` runs inside a Celery worker and, with no broker configured, in the submitting
process. Running a job twice is safe: the store's lease lets one runner at a time hold it, and the job
library resumes from the nodes already stored and writes nothing twice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from worker import runtime as _runtime
from worker.settings import TASK_FOR_KIND, QueueSettings

log = logging.getLogger("marco.worker")

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
    from sqlalchemy.exc import OperationalError

    return (OperationalError, BrokerError, RedisConnectionError, RedisTimeoutError, ConnectionError)


def _default_runner(rt: _runtime.WorkerRuntime, job_id: str) -> Any:
    from marco.jobs import execute_job

    return execute_job(rt.store, job_id, rt.backends, rt.name, lease_s=rt.settings.lease_s)


def run_job(job_id: str, rt: _runtime.WorkerRuntime | None = None) -> dict[str, Any]:
    """Run one job by id and return a JSON-able summary (the store holds the real outcome)."""
    from marco.store import StoreError

    rt = rt or _runtime.current()
    try:
        kind = rt.store.get_job(job_id).kind
    except StoreError:
        # Its batch was deleted (a submit that could not enqueue everything): nothing to do, drop it.
        log.warning("job %s is not in the store; message dropped", job_id)
        return {"job_id": job_id, "status": "missing"}
    run = RUNNERS.get(kind, _default_runner)
    started = time.perf_counter()
    try:
        outcome = run(rt, job_id)
    except SoftTimeLimitExceeded:
        reason = f"soft time limit exceeded ({rt.settings.soft_time_limit_s}s); raise $MARCO_TASK_SOFT_LIMIT"
        rt.store.fail_job(job_id, reason, worker=rt.name)
        log.warning("job %s stopped: %s", job_id, reason)
        return {"job_id": job_id, "status": "failed", "error": reason}
    summary = {"job_id": job_id, "kind": kind, "worker": rt.name, "elapsed_s": time.perf_counter() - started}
    status = getattr(outcome, "status", None)
    if status is not None:
        summary["status"] = status
    return summary


@runner("sleep")
def _sleep_job(rt: _runtime.WorkerRuntime, job_id: str) -> Any:
    """Hold the lease, wait ``payload["seconds"]``, finish: a job whose cost is pure waiting."""
    store = rt.store
    job = store.claim_job(job_id, rt.name, rt.settings.lease_s)
    if job is None:
        return None
    time.sleep(float(job.payload.get("seconds", 0.0)))
    store.finish_job(job_id, rt.name)
    return job


def register_tasks(app: Celery) -> dict[str, Task]:
    """Define the ``marco.*`` tasks on ``app`` (one per queue, plus ``marco.sleep``)."""
    settings: QueueSettings = app.conf.marco_settings
    errors = transient_errors()
    tasks: dict[str, Task] = {}
    for name in sorted(set(TASK_FOR_KIND.values())):

        def body(self: Task, job_id: str) -> dict[str, Any]:
            rt = _runtime.current(settings, name=f"{self.request.hostname}:{os.getpid()}")
            return run_job(job_id, rt)

        tasks[name] = app.task(
            body,
            name=name,
            bind=True,
            acks_late=True,
            reject_on_worker_lost=True,
            autoretry_for=errors,
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


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    # A pool process must not reuse the parent's connections (and the parent never loaded a model).
    _runtime.reset()
    specs = [s.strip() for s in os.environ.get(PRELOAD_ENV, "").split(",") if s.strip()]
    if specs:
        started = time.perf_counter()
        _runtime.current().preload(specs)
        log.info("loaded %s in %.1fs", ", ".join(specs), time.perf_counter() - started)


@worker_process_shutdown.connect
def _close_process(**_: Any) -> None:
    _runtime.reset()
