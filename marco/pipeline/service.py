"""Start, drive, resume a pipeline. With a broker the scheduler chains the stages; without one
:func:`drive` ticks the same scheduler in this process and every job runs inline."""

from __future__ import annotations

import uuid
from typing import Any, Callable

import marco.pipeline.stages  # noqa: F401  (registers the stage handlers)
from marco.pipeline.report import pipeline_status
from marco.pipeline.spec import PipelineSpec
from marco.pipeline.stages import plan_after, split_problems


def start(store: Any, dispatcher: Any, spec: PipelineSpec, pipeline_id: str | None = None) -> str:
    """Plan the first stages (round 1's search of the training split; the base model's evaluation) and hand
    their jobs to ``dispatcher``; returns the pipeline id. Nothing is written when the data is unusable."""
    pipeline_id = pipeline_id or str(uuid.uuid4())
    for d in spec.evaluation.datasets:
        split_problems(d.dataset, spec.data_dir, d.split)  # raises with what is wrong, before anything is written
    for r in range(1, spec.rounds + 1):
        split_problems(spec.task, spec.data_dir, spec.train.for_round(r))
    dispatcher.check()
    jobs = plan_after(store, pipeline_id, spec, None)
    dispatcher.enqueue(jobs, priority=spec.priority)
    return pipeline_id


def drive(store: Any, dispatcher: Any, pipeline_id: str, on_tick: Callable[[dict[str, Any]], None] | None = None,
          poll_s: float = 0.0, timeout_s: float | None = None) -> dict[str, Any]:
    """Tick the scheduler until the pipeline is done or failed; returns its final status."""
    import time

    from scheduler.service import Scheduler, SchedulerConfig

    scheduler = Scheduler(store, dispatcher, SchedulerConfig(interval_s=poll_s))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    idle = 0
    while True:
        report = scheduler.tick()
        status = pipeline_status(store, pipeline_id)
        if on_tick is not None:
            on_tick(status)
        if status["status"] in ("done", "failed"):
            scheduler.tick()  # the last stage's own handlers (the report) run once it has ended
            return pipeline_status(store, pipeline_id)
        if not dispatcher.distributed:
            # inline: every tick runs the next stage to its end; two quiet ticks mean nothing is left to start
            idle = 0 if report else idle + 1
            if idle >= 2:
                return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"pipeline {pipeline_id} still {status['status']} after {timeout_s}s")
        time.sleep(poll_s)


def resume(store: Any, dispatcher: Any, pipeline_id: str) -> list[str]:
    """Requeue the failed jobs of the pipeline's failed stages and let their handlers run again when they
    end; returns the requeued job ids (searches continue from their stored nodes)."""
    from scheduler.service import STAGED
    from scheduler.submit import enqueue_jobs

    status = pipeline_status(store, pipeline_id)
    if status["status"] != "failed":
        raise ValueError(f"pipeline {pipeline_id} is {status['status']}; only a failed pipeline can be resumed")
    dispatcher.check()
    requeued: list[str] = []
    for entry in status["stages"]:
        if entry["status"] != "failed":
            continue
        batch_id = entry["batch_id"]
        store.clear_staged(batch_id, STAGED)
        ids = store.requeue_failed(batch_id)
        requeued += ids
        enqueue_jobs(store, dispatcher, ids, priority=store.get_batch(batch_id).priority)
    return requeued
