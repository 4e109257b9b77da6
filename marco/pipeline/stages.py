"""The pipeline's stage handlers, registered in the scheduler's stage registry on import.

Every stage is a batch whose ``config`` carries ``pipeline_id``, ``pipeline_stage`` and the pipeline spec.
When a stage batch ends *done*, the scheduler calls the handler of its kind, which plans the next stage
(with a deterministic batch id, so a handler that runs twice writes nothing twice) and returns its jobs:

    train_reason (reason) → synthesize → train → test_after (reason, the new checkpoint)

``test_before`` (reason, the base model, the test split) starts with ``train_reason``; once ``test_after``
ends the report is written. A stage that ends failed or cancelled starts nothing: the pipeline stops there
with the failed job's reason in the store, and ``marco pipeline resume`` continues it.

Handlers run while the scheduler holds a row lock on the ended batch, so they never write that row.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from marco.pipeline.spec import PipelineSpec
from marco.search.tree import make_id
from scheduler.stages import stage

log = logging.getLogger("marco.pipeline")


def stage_batch_id(pipeline_id: str, stage_name: str) -> str:
    return make_id("pipeline", pipeline_id, stage_name)


def pipeline_dir(spec: PipelineSpec, pipeline_id: str) -> Path:
    return Path(spec.out).resolve() / f"{spec.name}-{pipeline_id[:8]}"


def stage_extra(pipeline_id: str, stage_name: str, spec: PipelineSpec) -> dict[str, Any]:
    return {"pipeline_id": pipeline_id, "pipeline_stage": stage_name, "pipeline": spec.to_dict()}


def _context(batch: Any) -> tuple[str, str, PipelineSpec] | None:
    config = batch.config or {}
    if not config.get("pipeline_id") or batch.status != "done":
        return None
    return config["pipeline_id"], config.get("pipeline_stage", ""), PipelineSpec.from_dict(config["pipeline"])


@stage("reason")
def after_reasoning(store: Any, batch: Any) -> list[tuple[str, str]]:
    """train_reason done → synthesise its trees; test_after done → write the report."""
    ctx = _context(batch)
    if ctx is None:
        return []
    pipeline_id, name, spec = ctx
    if name == "train_reason":
        from marco.synthesis.job import plan_synthesis

        out = pipeline_dir(spec, pipeline_id)
        run_id, job_id = plan_synthesis(
            store, spec.synthesis_config([str(batch.id)]), name=f"{spec.name}/synthesize",
            exports={"jsonl": str(out / "synthesis.jsonl")}, extra=stage_extra(pipeline_id, "synthesize", spec),
            priority=spec.priority, batch_id=stage_batch_id(pipeline_id, "synthesize"),
        )  # fmt: skip
        return [(job_id, "synthesize")]
    if name in ("test_after", "test_before"):
        from marco.pipeline.report import pipeline_report

        report = pipeline_report(store, pipeline_id)
        if report.get("after") is not None and report.get("before") is not None:
            out = pipeline_dir(spec, pipeline_id)
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(report, indent=2))
            log.info("pipeline %s: report written to %s", pipeline_id, out / "report.json")
    return []


@stage("synthesize")
def after_synthesis(store: Any, batch: Any) -> list[tuple[str, str]]:
    """synthesize done → fine-tune the base model on its examples."""
    ctx = _context(batch)
    if ctx is None:
        return []
    pipeline_id, _, spec = ctx
    from marco.pipeline.training import plan_training

    config = spec.sft_config(f"synthesis:{batch.id}", spec.model, str(pipeline_dir(spec, pipeline_id) / "sft"))
    _, job_id = plan_training(
        store, config, f"synthesis:{batch.id}", name=f"{spec.name}/train", priority=spec.priority,
        extra=stage_extra(pipeline_id, "train", spec), batch_id=stage_batch_id(pipeline_id, "train"),
    )  # fmt: skip
    return [(job_id, "train")]


@stage("train")
def after_training(store: Any, batch: Any) -> list[tuple[str, str]]:
    """train done → reason with the new checkpoint over the same test problems as ``test_before``."""
    ctx = _context(batch)
    if ctx is None:
        return []
    pipeline_id, _, spec = ctx
    from marco.pipeline.training import training_run_id
    from marco.store.models import Job
    from sqlalchemy import select

    with store.sessions() as s:
        job_id = s.scalar(select(Job.id).where(Job.batch_id == batch.id))
    run = store.get_training_run(training_run_id(str(job_id)))
    if run.output_model_id is None:
        raise RuntimeError(f"training run {run.id} is done but registered no checkpoint")
    problems = [p for _, p in _batch_problems(store, stage_batch_id(pipeline_id, "test_before"))]
    plan = store.create_batch(
        problems, [spec.eval_config()], kind="reason", name=f"{spec.name}/test_after", model=f"checkpoint:{run.output_model_id}",
        task=spec.task, chunk_size=spec.chunk, priority=spec.priority, extra=stage_extra(pipeline_id, "test_after", spec),
        batch_id=stage_batch_id(pipeline_id, "test_after"),
    )  # fmt: skip
    return [(j, "reason") for j in plan.job_ids]


def _batch_problems(store: Any, batch_id: str) -> list[tuple[str, Any]]:
    from sqlalchemy import select

    from marco.store.models import ProblemRow
    from marco.store.store import problem_from_row

    with store.sessions() as s:
        rows = s.scalars(
            select(ProblemRow).where(ProblemRow.batch_id == batch_id)
            .order_by(ProblemRow.dataset, ProblemRow.lang, ProblemRow.index)
        ).all()  # fmt: skip
    return [(str(r.id), problem_from_row(r)) for r in rows]
