"""Pipeline stages: what starts when a batch ends.

A stage handler is registered for a batch kind (``reason``, ``synthesize``, ``train``) and is called by
the scheduler once for every batch of that kind that ended (done, failed or cancelled). It may plan the
next batch (synthesis after reasoning, training after synthesis, an evaluation batch after training) and
returns the ``(job_id, kind)`` pairs to enqueue. Issue 5 registers the synthesis/SFT stages.

    @stage("reason")
    def synthesize_after_reasoning(store, batch) -> list[tuple[str, str]]:
        if batch.config.get("pipeline") != "sft" or batch.status != "done":
            return []
        plan = store.create_batch(..., kind="synthesize")
        return [(job_id, "synthesize") for job_id in plan.job_ids]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

StageHandler = Callable[[Any, Any], Sequence[tuple[str, str]]]

_HANDLERS: dict[str, list[StageHandler]] = {}


def stage(batch_kind: str) -> Callable[[StageHandler], StageHandler]:
    """Register ``fn(store, batch) -> [(job_id, kind), ...]`` to run when a batch of ``batch_kind`` ends."""

    def wrap(fn: StageHandler) -> StageHandler:
        handlers = _HANDLERS.setdefault(batch_kind, [])
        if fn not in handlers:
            handlers.append(fn)
        return fn

    return wrap


def unregister(batch_kind: str, fn: StageHandler) -> None:
    if fn in _HANDLERS.get(batch_kind, []):
        _HANDLERS[batch_kind].remove(fn)


def handlers(batch_kind: str) -> list[StageHandler]:
    return list(_HANDLERS.get(batch_kind, []))


def on_batch_end(store: Any, batch: Any) -> list[tuple[str, str]]:
    """Run every handler of ``batch.kind``; their jobs, concatenated."""
    jobs: list[tuple[str, str]] = []
    for fn in handlers(batch.kind):
        jobs.extend(fn(store, batch))
    return jobs
