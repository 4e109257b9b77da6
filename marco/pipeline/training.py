"""SFT as a stored job: plan a ``train`` batch, run it, record the run and register its checkpoint.

The job resolves its data (a ``datasets`` directory, a JSONL or Parquet file, or ``synthesis:ID``: a stored
synthesis run exported to ``OUTPUT_DIR/data``), records a ``training_runs`` row (base model, data,
hyperparameters, then loss per step, final metrics, checkpoint path, status), trains through
:func:`marco.sft.run_sft` (``torchrun`` when ``nproc > 1``) and registers the checkpoint in ``models`` with
its lineage, so ``checkpoint:ID`` works wherever a model is accepted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from marco.search.tree import make_id
from marco.store.training import SYNTHESIS_PREFIX
from marco.synthesis.lease import LeaseKeeper

log = logging.getLogger(__name__)


def training_run_id(job_id: str) -> str:
    """The ``training_runs`` id of a train job (deterministic: a retried job updates the same row)."""
    return make_id("training_run", job_id)


def check_data(store: Any, data: str) -> str | None:
    """Fail early (one line) on unusable data; returns the synthesis run id when ``data`` names one."""
    if data.startswith(SYNTHESIS_PREFIX):
        run_id = store.resolve_synthesis(data)
        if not store.cot_examples(run_id, "sft"):
            raise ValueError(f"{data}: the synthesis run {run_id} holds no examples (is it done?)")
        return run_id
    from marco.sft.data import load_chats

    load_chats(data)  # raises FileNotFoundError / ValueError with the row at fault
    return None


def plan_training(
    store: Any,
    config: Any,
    data: str,
    *,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
    priority: int = 0,
    batch_id: str | None = None,
    check: bool = True,
) -> tuple[str, str]:
    """Write a ``train`` batch and its job for ``config`` (an :class:`marco.sft.SFTConfig`) on ``data``;
    returns ``(batch_id, job_id)``. ``data`` may be ``synthesis:<run, its name, or its source batch>``."""
    synthesis_id = check_data(store, data) if check else None
    if data.startswith(SYNTHESIS_PREFIX) and synthesis_id is not None:
        data = SYNTHESIS_PREFIX + synthesis_id
    config = replace(config, output_dir=str(Path(config.output_dir).resolve()), data=data)
    payload = {"sft": asdict(config), "data": data, "synthesis_id": synthesis_id}
    return store.create_stage_batch(
        "train", payload, name=name, model=config.base, priority=priority, batch_id=batch_id,
        config={"data": data, "synthesis_id": synthesis_id, "sft": config.hyperparameters(),
                "output_dir": config.output_dir, **(extra or {})},
    )  # fmt: skip


def _resolve_data(store: Any, data: str, synthesis_id: str | None, output_dir: str) -> tuple[str, int | None]:
    """The path training reads, and its number of examples."""
    from marco.synthesis.job import export_run

    if synthesis_id is None and data.startswith(SYNTHESIS_PREFIX):
        synthesis_id = store.resolve_synthesis(data)
    if synthesis_id is not None:
        target = Path(output_dir) / "data"
        shutil.rmtree(target, ignore_errors=True)  # a retried job exports afresh
        written = export_run(store, synthesis_id, out=str(target))
        return str(target), written.get("out")
    from marco.sft.data import load_chats

    return data, len(load_chats(data))


def run_training(store: Any, run_id: str, payload: dict[str, Any], batch_id: str | None = None,
                 job_id: str | None = None) -> Any:
    """Train once and record everything (the body of a train job); returns the :class:`SFTResult`."""
    from marco.sft import SFTConfig, run_sft
    from marco.sft import base_model
    from marco.store.store import utcnow

    config = SFTConfig(**{k: v for k, v in payload["sft"].items() if k in SFTConfig.__dataclass_fields__})
    data = str(payload.get("data") or config.data)
    synthesis_id = payload.get("synthesis_id")
    store.create_training_run(
        run_id, batch_id=batch_id, job_id=job_id, base=config.base, data=data, synthesis_id=synthesis_id,
        hyperparameters=config.hyperparameters(),
    )  # fmt: skip
    store.update_training_run(
        run_id, status="running", error=None, started_at=utcnow(), finished_at=None,
        base_model_id=store.ensure_model(config.base),
    )  # fmt: skip
    data_path, n_examples = _resolve_data(store, data, synthesis_id, config.output_dir)
    store.update_training_run(run_id, data_path=data_path, n_examples=n_examples)
    config = replace(config, data=data_path, run_id=run_id)

    def register(result: Any) -> None:
        lineage = {**result.lineage(), "dataset": data, "synthesis_id": synthesis_id, "n_examples": n_examples}
        store.update_training_run(run_id, losses=list(result.losses), metrics=dict(result.metrics),
                                  checkpoint=result.checkpoint)  # fmt: skip
        store.register_checkpoint(run_id, result.checkpoint, config.base, lineage)

    previous = base_model._checkpoint_resolver
    base_model.set_checkpoint_resolver(store.checkpoint_path)  # `--base checkpoint:ID` trains on a checkpoint
    try:
        result = run_sft(config, on_checkpoint=register)
    finally:
        base_model.set_checkpoint_resolver(previous)
    store.update_training_run(run_id, status="done", finished_at=utcnow())
    return result


def run_training_job(store: Any, claim: Any, backends: Any, worker: str, lease_s: float) -> Any:
    """The ``train`` job runner :func:`marco.jobs.execute_job` hands claimed jobs to."""
    from marco.jobs import JobOutcome
    from marco.store.store import utcnow

    outcome = JobOutcome(claim.id, "running", attempts=claim.attempts)
    run_id = training_run_id(claim.id)
    try:
        with LeaseKeeper(store, claim.id, worker, lease_s) as lease:
            run_training(store, run_id, claim.payload, batch_id=claim.batch_id, job_id=claim.id)
        if lease.lost:
            outcome.status, outcome.error = "lost", f"job {claim.id} lost its lease; another worker owns it now"
            return outcome
        store.finish_job(claim.id, worker=worker)
        outcome.status = "done"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.exception("train job %s failed", claim.id)
        try:
            store.update_training_run(run_id, status="failed", error=reason, finished_at=utcnow())
        except Exception:  # the row may not exist yet (bad payload); the job keeps the reason either way
            pass
        store.fail_job(claim.id, reason, worker=worker)
        outcome.status, outcome.error = "failed", reason
    return outcome
