"""Planning a batch: load a dataset's problems, write the batch and its jobs, enqueue one message per job.

Either the whole batch is written and enqueued, or nothing is left behind: the broker is checked before
anything is written, and a batch whose messages could not all be sent is deleted again (a worker that got
one of its messages finds no job and drops it).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from marco.search.base import SearchConfig
from marco.tasks.base import Problem
from scheduler.dispatch import Dispatcher

log = logging.getLogger("marco.scheduler")


@dataclass
class SubmitRequest:
    """What ``marco submit`` asks for."""

    task: str
    configs: list[SearchConfig]
    model: str = "smollm2"
    data_dir: str | None = None
    langs: list[str] | None = None
    limit: int | None = None
    chunk: int = 8
    name: str | None = None
    priority: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError("--chunk must be a positive number of problems per job")
        if not 0 <= self.priority <= 9:
            raise ValueError("--priority must be between 0 and 9 (higher runs first)")
        if self.limit is not None and self.limit <= 0:
            raise ValueError("--limit must be positive")


def load_problems(request: SubmitRequest) -> list[Problem]:
    from marco.tasks import get_task

    problems = get_task(request.task).load(request.data_dir, request.langs, request.limit)
    if not problems:
        raise ValueError(f"no {request.task} problems found for languages {request.langs or 'default'}")
    return problems


def check_model(store: Any, model: str) -> None:
    """Fail before anything is written when ``model`` is ``checkpoint:ID`` and the store has no such checkpoint
    (raises :class:`~marco.store.StoreError`), or names no loadable model (``ValueError``, see
    :func:`model_spec_problem`)."""
    if model.startswith("checkpoint:"):
        store.get_checkpoint(model)
        return
    problem = model_spec_problem(model)
    if problem:
        raise ValueError(problem)


def model_spec_problem(spec: str) -> str | None:
    """Why ``spec`` names no model a worker could load (None when it may): checked at submit, so a typo
    fails once, before anything is written, instead of failing every job of the batch on the workers.
    A Hugging Face id (``org/name``) is accepted: the workers' caches are not visible from here."""
    import os

    if spec in ("scripted", "smollm2"):
        return None
    if spec.startswith("scripted:"):
        from marco.llm.scripted import parse_spec

        try:
            parse_spec(spec)
        except ValueError as exc:
            return str(exc)
        return None
    if spec.endswith(".gguf"):
        return None if os.path.isfile(spec) else f"no GGUF file at {spec}"
    if os.path.isdir(spec):
        return None
    if os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1:
        return f"no model directory at {spec}"
    if spec.count("/") == 1 and all(spec.split("/")):
        return None
    return (f"unknown model {spec!r}: give smollm2, a .gguf file, a model directory, a Hugging Face id "
            "(org/name) or checkpoint:ID")


SUBMIT_ROWS_PER_TXN = 5_000  # problems per transaction of a large distributed submission


def submit(
    store: Any,
    dispatcher: Dispatcher,
    request: SubmitRequest,
    problems: Sequence[Problem] | None = None,
    progress: Callable[[int, int], None] | None = None,
    rows_per_txn: int = SUBMIT_ROWS_PER_TXN,
) -> Any:
    """Write the batch and enqueue its jobs; returns the store's ``BatchPlan``.

    Raises :class:`~scheduler.dispatch.BrokerUnavailable` (nothing written) when the broker is down, and
    :class:`~marco.store.StoreError` (nothing written) for a ``checkpoint:ID`` the store does not know.
    With an in-process dispatcher the jobs have run by the time this returns.

    Distributed, a batch is written ``rows_per_txn`` problems per transaction and each chunk's jobs are
    enqueued as soon as it is committed: a 100,000-problem batch never holds one long transaction, workers
    start on its first jobs at once, and ``progress(problems_written, total)`` is called after each chunk.
    Should any chunk fail to be written or sent, the whole batch is deleted again.
    """
    check_model(store, request.model)
    dispatcher.check()
    problems = list(problems) if problems is not None else load_problems(request)
    kwargs = dict(
        kind="reason",
        name=request.name,
        model=request.model,
        task=request.task,
        chunk_size=request.chunk,
        priority=request.priority,
        extra={"langs": request.langs, "limit": request.limit, **request.extra},
    )
    if not dispatcher.distributed:
        plan = store.create_batch(problems, request.configs, **kwargs)
        dispatcher.enqueue([(job_id, "reason") for job_id in plan.job_ids], priority=request.priority)
        return plan
    batch_id = str(uuid.uuid4())

    def send(job_ids: list[str], written: int, total: int) -> None:
        dispatcher.enqueue([(job_id, "reason") for job_id in job_ids], priority=request.priority)
        if progress is not None:
            progress(written, total)

    try:
        return store.create_batch(problems, request.configs, batch_id=batch_id, rows_per_txn=rows_per_txn, on_chunk=send, **kwargs)
    except BaseException:
        store.delete_batch(batch_id)
        log.error("submission failed; batch %s removed again", batch_id)
        raise


def enqueue_jobs(store: Any, dispatcher: Dispatcher, job_ids: Sequence[str], priority: int = 0) -> None:
    """Send messages for existing jobs (``marco retry``), with each job's own kind."""
    kinds = store.job_kinds(job_ids)
    dispatcher.enqueue([(job_id, kinds[job_id]) for job_id in job_ids if job_id in kinds], priority=priority)
    if dispatcher.distributed:
        store.mark_enqueued(list(kinds))  # the scheduler's stranded-job clock restarts from this send
