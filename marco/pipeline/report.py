"""Pipeline status and the before/after report, computed from the store (the source of truth)."""

from __future__ import annotations

from typing import Any

from marco.pipeline.spec import STAGES

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


def pipeline_status(store: Any, pipeline_id: str) -> dict[str, Any]:
    """Each stage's batch and status (``pending`` before it exists), the pipeline's status and, when a stage
    failed, which one and why."""
    batches = {(b.config or {}).get("pipeline_stage"): b for b in store.pipeline_batches(pipeline_id)}
    if not batches:
        from marco.store import StoreError

        raise StoreError(f"no pipeline {pipeline_id!r}: `marco pipeline run FILE.yaml` prints the id")
    stages = []
    failed: tuple[str, str | None] | None = None
    for name in STAGES:
        b = batches.get(name)
        entry: dict[str, Any] = {"stage": name, "status": b.status if b else "pending", "batch_id": str(b.id) if b else None}
        if b is not None and b.status in ("failed", "cancelled"):
            entry["error"] = _failure(store, str(b.id)) or b.status
            failed = failed or (name, entry["error"])
        stages.append(entry)
    any_b = next(iter(batches.values()))
    if failed:
        status = "failed"
    elif all(s["status"] == "done" for s in stages):
        status = "done"
    else:
        status = "running"
    out: dict[str, Any] = {
        "pipeline_id": pipeline_id, "name": (any_b.config or {}).get("pipeline", {}).get("name"), "status": status,
        "stages": stages,
    }  # fmt: skip
    if failed:
        out["failed_stage"], out["error"] = failed
    return out


def pipeline_report(store: Any, pipeline_id: str) -> dict[str, Any]:
    """Status plus the test split before (base model) against after (the fine-tuned checkpoint), and the
    training run's losses and the synthesis counts."""
    status = pipeline_status(store, pipeline_id)
    by_stage = {s["stage"]: s for s in status["stages"]}
    report: dict[str, Any] = {**status, "before": None, "after": None}
    for key, name in (("before", "test_before"), ("after", "test_after"), ("train_split", "train_reason")):
        if by_stage[name]["status"] == "done":
            report[key] = batch_metrics(store, by_stage[name]["batch_id"])
    synth = by_stage["synthesize"]
    if synth["batch_id"]:
        result = (store.get_batch(synth["batch_id"]).config or {}).get("result") or {}
        report["synthesis"] = {k: result.get(k) for k in ("run_id", "searches", "problems", "examples", "pairs")}
    train = by_stage["train"]
    if train["batch_id"]:
        from sqlalchemy import select

        from marco.store.models import TrainingRun

        with store.sessions() as s:
            run = s.scalar(select(TrainingRun).where(TrainingRun.batch_id == train["batch_id"]))
        if run is not None:
            report["training"] = {
                "training_run_id": str(run.id), "status": run.status, "checkpoint": run.checkpoint,
                "model": f"checkpoint:{run.output_model_id}" if run.output_model_id else None,
                "losses": list(run.losses or []), "metrics": dict(run.metrics or {}),
            }  # fmt: skip
    if report["before"] and report["after"]:
        report["delta"] = {
            k: (report["after"][k] - report["before"][k])
            if report["after"][k] is not None and report["before"][k] is not None else None
            for k in ("accuracy", "mean_confidence", "tokens_per_problem")
        }  # fmt: skip
    return report
