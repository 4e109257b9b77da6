"""Synthesis as a stored job: plan it (a ``synthesize`` batch with one job), run it, export its examples.

The job reads completed searches from the store, writes its examples to ``cot_examples`` (deterministic
ids: a rerun writes nothing twice), keeps its filter report in ``batches.config["result"]`` and, when the
job names them, writes a ``datasets`` directory and a JSONL file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from marco.data.examples import save_dataset, write_jsonl
from marco.synthesis.build import example_row, pair_row, row_to_example, row_to_pair, synthesize
from marco.synthesis.config import SynthesisConfig, SynthesisResult


log = logging.getLogger(__name__)

EXPORT_KEYS = ("out", "jsonl", "pairs_out", "pairs_jsonl")


def plan_synthesis(
    store: Any,
    config: SynthesisConfig,
    *,
    name: str | None = None,
    exports: dict[str, str | None] | None = None,
    extra: dict[str, Any] | None = None,
    priority: int = 0,
    batch_id: str | None = None,
    allow_empty: bool = False,
) -> tuple[str, str]:
    """Write a ``synthesize`` batch and its job; returns ``(run_id, job_id)``. Batch names are resolved to
    ids now, so a typo fails here rather than in a worker. ``allow_empty``: a run that keeps no example
    ends ``done`` with the reason in its result (a pipeline whose SFT has other sources) instead of failing."""
    sources = [store.resolve_batch(b) for b in config.batches]
    config = SynthesisConfig.from_dict({**config.to_dict(), "batches": sources})
    paths = {k: (str(Path(v).resolve()) if v else None) for k, v in (exports or {}).items() if k in EXPORT_KEYS}
    payload = {"synthesis": config.to_dict(), **paths, **({"allow_empty": True} if allow_empty else {})}
    return store.create_stage_batch(
        "synthesize", payload, name=name, dataset=config.dataset, priority=priority, batch_id=batch_id,
        config={"source_batches": sources, "synthesis": config.to_dict(), **(extra or {})},
    )  # fmt: skip


def write_result(store: Any, result: SynthesisResult, fence: Any = None) -> None:
    rows = [example_row(result.run_id, e) for e in result.examples]
    rows += [pair_row(result.run_id, p, i) for i, p in enumerate(result.pairs)]
    store.write_cot_examples(rows, fence=fence)


def export_run(
    store: Any,
    run_id: str,
    out: str | None = None,
    jsonl: str | None = None,
    pairs_out: str | None = None,
    pairs_jsonl: str | None = None,
) -> dict[str, int]:
    """Write a run's stored examples (and pairs) as a ``datasets`` directory and/or JSONL; returns counts."""
    written: dict[str, int] = {}
    if out or jsonl:
        examples = [row_to_example(r) for r in store.cot_examples(run_id, "sft")]
        if out:
            save_dataset(examples, out)
            written["out"] = len(examples)
        if jsonl:
            written["jsonl"] = write_jsonl(examples, jsonl)
    if pairs_out or pairs_jsonl:
        pairs = [row_to_pair(r) for r in store.cot_examples(run_id, "preference")]
        if pairs_out:
            if not pairs:
                raise ValueError("no preference pair was made (a problem needs a correct and a wrong path)")
            save_dataset(pairs, pairs_out)
            written["pairs_out"] = len(pairs)
        if pairs_jsonl:
            written["pairs_jsonl"] = write_jsonl(pairs, pairs_jsonl)
    return written


def _claim_paths(exports: dict[str, Any], token: int) -> dict[str, Any]:
    """Where this claim writes its exports before they move into place: next to each target, named by the
    claim's token, so a successor claim never writes into the same folder or file."""
    return {k: (f"{v}.claim-{token}" if v else v) for k, v in exports.items()}


def _move_into_place(staged: dict[str, Any], exports: dict[str, Any]) -> None:
    import os
    import shutil

    for key, target in exports.items():
        src = staged.get(key)
        if not target or not src or not Path(src).exists():
            continue
        if Path(target).is_dir():
            shutil.rmtree(target)
        os.replace(src, target)


def run_synthesis(store: Any, run_id: str, payload: dict[str, Any], fence: Any = None) -> SynthesisResult:
    """Synthesise, store and export one run (the body of a synthesis job). With ``fence`` (the job's claim)
    every row is written only while the claim holds the job, and exports are staged under per-claim names
    and moved into place only after a fenced write succeeded."""
    config = SynthesisConfig.from_dict(payload.get("synthesis") or {})
    result = synthesize(store, config, run_id)
    empty = None
    if not result.examples:
        steps = ", ".join(f"{s.name} removed {s.removed}" for s in result.report.steps if s.removed)
        empty = f"no example passed the filters ({result.searches} completed searches{'; ' + steps if steps else ''})"
        if not payload.get("allow_empty"):
            raise ValueError(f"{empty}: loosen the filters or reason over more problems")
        log.warning("synthesis %s: %s; the run ends with no example", run_id, empty)
    write_result(store, result, fence=fence)
    exports = {k: payload.get(k) for k in EXPORT_KEYS}
    staged = _claim_paths(exports, fence.token) if fence is not None else exports
    written = export_run(store, run_id, **staged) if any(exports.values()) else {}
    summary = {**result.summary(), "exports": {k: v for k, v in exports.items() if v}, "written": written,
               **({"empty": empty} if empty else {})}
    store.set_batch_result(run_id, summary, fence=fence)  # fails (nothing moved) once the claim is gone
    if fence is not None:
        _move_into_place(staged, exports)
    return result


def run_synthesis_job(store: Any, claim: Any, backends: Any, worker: str, lease_s: float, heartbeat: Any = None) -> Any:
    """The ``synthesize`` job runner :func:`marco.jobs.execute_job` hands claimed jobs to: it stops within
    one renewal period of losing its lease (the heartbeat interrupts it) and writes only under its claim."""
    from marco.jobs import run_under_claim

    def body(check: Any) -> int:
        return int(run_synthesis(store, claim.batch_id, claim.payload, fence=claim.fence).searches)

    # one long step with no progress to report (reads, filters, exports): no progress timeout
    return run_under_claim(store, claim, worker, lease_s, heartbeat, body, "synthesis", progress_timeout=False)
