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
    synthesis_id = None
    if config.sources:  # several sources: each may name a synthesis run (resolved now, exported by the job)
        sources = []
        for src in config.sources:
            sid = check_data(store, src["path"]) if check else None
            sources.append({**src, "path": SYNTHESIS_PREFIX + sid if sid else src["path"]})
        config = replace(config, data="", sources=sources)
        data = ", ".join(s["path"] for s in sources)
    else:
        synthesis_id = check_data(store, data) if check else None
        if data.startswith(SYNTHESIS_PREFIX) and synthesis_id is not None:
            data = SYNTHESIS_PREFIX + synthesis_id
        config = replace(config, data=data)
    config = replace(config, output_dir=str(Path(config.output_dir).resolve()))
    payload = {"sft": asdict(config), "data": data, "synthesis_id": synthesis_id}
    return store.create_stage_batch(
        "train", payload, name=name, model=config.base, priority=priority, batch_id=batch_id,
        config={"data": data, "synthesis_id": synthesis_id, "sft": config.hyperparameters(),
                "output_dir": config.output_dir, **(extra or {})},
    )  # fmt: skip


def _resolve_data(store: Any, data: str, synthesis_id: str | None, output_dir: str,
                  folder: str = "data") -> tuple[str, int | None]:
    """The path training reads, and its number of examples."""
    from marco.synthesis.job import export_run

    if synthesis_id is None and data.startswith(SYNTHESIS_PREFIX):
        synthesis_id = store.resolve_synthesis(data)
    if synthesis_id is not None:
        target = Path(output_dir) / folder
        shutil.rmtree(target, ignore_errors=True)  # a retried job exports afresh
        written = export_run(store, synthesis_id, out=str(target))
        return str(target), written.get("out")
    from marco.sft.data import load_chats

    return data, len(load_chats(data))


def claim_output_dir(output_dir: str, token: int | None) -> str:
    """The folder one claim of a train job writes into: ``OUTPUT_DIR/claim-N`` (N: the claim's fencing
    token), so a run that lost its lease never shares a folder with its successor."""
    return output_dir if token is None else str(Path(output_dir) / f"claim-{token}")


def run_training(store: Any, run_id: str, payload: dict[str, Any], batch_id: str | None = None,
                 job_id: str | None = None, fence: Any = None, check: Any = None) -> Any:
    """Train once and record everything (the body of a train job); returns the :class:`SFTResult`.

    With ``fence`` (the job's claim) every row is written only while the claim holds the job and the run
    writes into its own ``OUTPUT_DIR/claim-N``; ``check`` is called between training steps (it raises to
    stop the run)."""
    from marco.sft import SFTConfig, run_sft
    from marco.sft import base_model
    from marco.store.store import utcnow

    config = SFTConfig.from_dict(payload["sft"])
    config = replace(config, output_dir=claim_output_dir(config.output_dir, getattr(fence, "token", None)))
    data = str(payload.get("data") or config.data)
    synthesis_id = payload.get("synthesis_id")
    store.create_training_run(
        run_id, fence=fence, batch_id=batch_id, job_id=job_id, base=config.base, data=data,
        synthesis_id=synthesis_id, hyperparameters=config.hyperparameters(),
    )  # fmt: skip
    store.update_training_run(
        run_id, fence=fence, status="running", error=None, started_at=utcnow(), finished_at=None,
        base_model_id=store.ensure_model(config.base),
    )  # fmt: skip
    if config.sources:
        resolved, n_examples = [], 0
        for i, src in enumerate(config.sources):
            path, n = _resolve_data(store, src["path"], None, config.output_dir, folder=f"data-{i}")
            resolved.append({**src, "path": path})
            n_examples += n or 0
        data_path = ", ".join(s["path"] for s in resolved)
        config = replace(config, sources=resolved, run_id=run_id)
    else:
        data_path, n_examples = _resolve_data(store, data, synthesis_id, config.output_dir)
        config = replace(config, data=data_path, run_id=run_id)
    store.update_training_run(run_id, fence=fence, data_path=data_path, n_examples=n_examples)

    def register(result: Any) -> None:
        lineage = {**result.lineage(), "dataset": data, "synthesis_id": synthesis_id, "n_examples": n_examples}
        store.update_training_run(run_id, fence=fence, losses=list(result.losses), metrics=dict(result.metrics),
                                  checkpoint=result.checkpoint)  # fmt: skip
        store.register_checkpoint(run_id, result.checkpoint, config.base, lineage, fence=fence)

    with base_model.checkpoint_resolver(store.checkpoint_path):  # `--base checkpoint:ID` trains on a checkpoint
        result = run_sft(config, on_checkpoint=register, check=check)
    store.update_training_run(run_id, fence=fence, status="done", finished_at=utcnow())
    return result


def run_training_job(store: Any, claim: Any, backends: Any, worker: str, lease_s: float, heartbeat: Any = None) -> Any:
    """The ``train`` job runner :func:`marco.jobs.execute_job` hands claimed jobs to: it stops within one
    renewal period of losing its lease (the heartbeat interrupts it, a torchrun child is terminated) and
    writes only under its claim, into its own folder."""
    from marco.jobs import run_under_claim
    from marco.store.store import utcnow

    run_id = training_run_id(claim.id)

    def body(check: Any) -> int:
        run_training(store, run_id, claim.payload, batch_id=claim.batch_id, job_id=claim.id, fence=claim.fence,
                     check=check)  # fmt: skip
        return 0

    def on_failure(reason: str) -> None:
        store.update_training_run(run_id, fence=claim.fence, status="failed", error=reason, finished_at=utcnow())

    return run_under_claim(store, claim, worker, lease_s, heartbeat, body, "train", on_failure=on_failure)
