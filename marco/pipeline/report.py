"""Pipeline status and report (per round: search, synthesis and training; the evaluation table), computed
from the store (the source of truth)."""

from __future__ import annotations

from typing import Any

from marco.pipeline.spec import PipelineSpec

ENDED = ("done", "failed", "cancelled")


def batch_metrics(store: Any, batch_id: str) -> dict[str, Any]:
    """Accuracy, mean confidence of the chosen answers, and tokens of a reason batch."""
    rows = store.batch_rows(batch_id)
    ended = [s for s, _ in rows if s.status == "done"]
    scored = [s for s in ended if s.correct is not None]
    confidences = [s.confidence for s in ended if s.confidence is not None]
    tokens = sum(int(s.tokens or 0) for s, _ in rows)
    return {
        "batch_id": batch_id,
        "searches": len(rows),
        "done": len(ended),
        "accuracy": (sum(bool(s.correct) for s in scored) / len(scored)) if scored else None,
        "mean_confidence": (sum(confidences) / len(confidences)) if confidences else None,
        "tokens": tokens,
        "tokens_per_problem": tokens / len(rows) if rows else 0.0,
    }


def _failure(store: Any, batch_id: str) -> str | None:
    from sqlalchemy import select

    from marco.store.models import Job, Search

    with store.sessions() as s:
        reason = s.scalar(select(Job.error).where(Job.batch_id == batch_id, Job.error.is_not(None)).order_by(Job.seq))
        if reason is None:
            reason = s.scalar(select(Search.error).where(Search.batch_id == batch_id, Search.error.is_not(None)))
    return reason


def pipeline_spec(store: Any, pipeline_id: str) -> tuple[PipelineSpec, dict[str, Any]]:
    """The pipeline's spec and its stage batches by stage name."""
    batches = {(b.config or {}).get("pipeline_stage"): b for b in store.pipeline_batches(pipeline_id)}
    if not batches:
        from marco.store import StoreError

        raise StoreError(f"no pipeline {pipeline_id!r}: `marco pipeline run FILE.yaml` prints the id")
    any_b = next(iter(batches.values()))
    try:
        return PipelineSpec.from_dict((any_b.config or {})["pipeline"]), batches
    except ValueError as exc:
        from marco.store import StoreError

        raise StoreError(f"pipeline {pipeline_id} was written by an older marco ({exc}); its batches are still "
                         "in the store (`marco report BATCH`)") from None


def pipeline_status(store: Any, pipeline_id: str) -> dict[str, Any]:
    """Each stage's batch and status (``pending`` before it exists), the pipeline's status and, when a stage
    failed, which one and why."""
    spec, batches = pipeline_spec(store, pipeline_id)
    stages = []
    failed: tuple[str, str | None] | None = None
    for st in spec.stages():
        b = batches.get(st.name)
        entry: dict[str, Any] = {"stage": st.name, "status": b.status if b else "pending", "batch_id": str(b.id) if b else None}
        if b is not None and b.status in ("failed", "cancelled"):
            entry["error"] = _failure(store, str(b.id)) or b.status
            failed = failed or (st.name, entry["error"])
        stages.append(entry)
    if failed:
        status = "failed"
    elif all(s["status"] == "done" for s in stages):
        status = "done"
    else:
        status = "running"
    out: dict[str, Any] = {"pipeline_id": pipeline_id, "name": spec.name, "status": status, "stages": stages}
    if failed:
        out["failed_stage"], out["error"] = failed
    return out


def _training(store: Any, batch_id: str) -> dict[str, Any] | None:
    from sqlalchemy import select

    from marco.store.models import TrainingRun

    with store.sessions() as s:
        run = s.scalar(select(TrainingRun).where(TrainingRun.batch_id == batch_id))
    if run is None:
        return None
    return {
        "training_run_id": str(run.id), "status": run.status, "checkpoint": run.checkpoint, "base": run.base,
        "model": f"checkpoint:{run.output_model_id}" if run.output_model_id else None,
        "data": run.data, "n_examples": run.n_examples, "losses": list(run.losses or []),
        "metrics": dict(run.metrics or {}),
    }  # fmt: skip


def pipeline_report(store: Any, pipeline_id: str) -> dict[str, Any]:
    """Status, each round (its search of the training split, its synthesis counts, its training run) and
    the evaluation table (:func:`marco.compare.matrix.build_matrix`) over the evaluation batches done so far."""
    from marco.compare.matrix import MatrixSource, build_matrix

    status = pipeline_status(store, pipeline_id)
    spec, batches = pipeline_spec(store, pipeline_id)
    by_stage = {s["stage"]: s for s in status["stages"]}
    rounds = []
    for r in range(1, spec.rounds + 1):
        entry: dict[str, Any] = {"round": r}
        search = by_stage[f"round{r}/search"]
        if search["status"] == "done":
            entry["search"] = batch_metrics(store, search["batch_id"])
            entry["search"]["model"] = (batches[f"round{r}/search"].config or {}).get("model")
        synth = by_stage[f"round{r}/synthesize"]
        if synth["batch_id"]:
            result = (batches[f"round{r}/synthesize"].config or {}).get("result") or {}
            entry["synthesis"] = {k: result.get(k) for k in ("run_id", "searches", "problems", "examples", "pairs", "empty")}
        train = by_stage[f"round{r}/train"]
        if train["batch_id"]:
            entry["training"] = _training(store, train["batch_id"])
        rounds.append(entry)
    sources = []
    for st in spec.stages():
        b = batches.get(st.name)
        if st.round or b is None or b.status != "done":
            continue
        sources.append(MatrixSource(str(b.id), st.model_key, str((b.config or {}).get("model")), st.dataset))
    last = f"round{spec.rounds}" if spec.rounds else spec.evaluation.trained
    return {**status, "rounds": rounds, "table": build_matrix(store, sources, last_trained=last)}
