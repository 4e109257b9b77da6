"""Start, drive, resume a pipeline. With a broker the scheduler chains the stages; without one
:func:`drive` ticks the same scheduler in this process and every job runs inline."""

from __future__ import annotations

import uuid
from typing import Any, Callable

import marco.pipeline.stages  # noqa: F401  (registers the stage handlers)
from marco.pipeline.report import pipeline_status
from marco.pipeline.spec import PipelineSpec
from marco.pipeline.stages import stage_batch_id, stage_extra


def _split_problems(spec: PipelineSpec, split: Any) -> list[Any]:
    from marco.tasks import get_task

    limit = None if split.limit is None else split.start + split.limit
    problems = get_task(spec.task).load(spec.data_dir, split.langs, limit)
    by_lang: dict[str, list[Any]] = {}
    for p in problems:
        by_lang.setdefault(p.lang, []).append(p)
    chosen = [p for lang in by_lang for p in by_lang[lang][split.start:]]
    if not chosen:
        raise ValueError(f"the split {split} of {spec.task} holds no problems")
    return chosen


def start(store: Any, dispatcher: Any, spec: PipelineSpec, pipeline_id: str | None = None) -> str:
    """Plan the first stages (reason over the train split; the base model over the test split) and hand
    their jobs to ``dispatcher``; returns the pipeline id. Nothing is written when the data is unusable."""
    pipeline_id = pipeline_id or str(uuid.uuid4())
    train, test = _split_problems(spec, spec.train), _split_problems(spec, spec.test)
    overlap = {p.key for p in train} & {p.key for p in test}
    if overlap:
        raise ValueError(f"train and test splits share {len(overlap)} problem(s), e.g. {sorted(overlap)[0]}: "
                         "give the test split another start")
    dispatcher.check()
    jobs: list[tuple[str, str]] = []
    for name, problems, config in (("train_reason", train, spec.search_config()), ("test_before", test, spec.eval_config())):
        plan = store.create_batch(
            problems, [config], kind="reason", name=f"{spec.name}/{name}", model=spec.model, task=spec.task,
            chunk_size=spec.chunk, priority=spec.priority, extra=stage_extra(pipeline_id, name, spec),
            batch_id=stage_batch_id(pipeline_id, name),
        )  # fmt: skip
        jobs += [(j, "reason") for j in plan.job_ids]
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
