"""``marco synthesize``: stored search trees → CoT examples (and preference pairs), as a job."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store


def queue_mode(queue: bool | None) -> Any:
    """The dispatcher to use: Celery when ``--queue`` (or, by default, when ``$MARCO_BROKER_URL`` is set),
    else in-process. Exits 1 when ``--queue`` is asked for without a broker or the broker is down."""
    from scheduler.dispatch import BrokerUnavailable, make_dispatcher
    from worker.settings import QueueSettings

    try:
        settings = QueueSettings.from_env()
    except ValueError as exc:
        fail(str(exc))
    if queue and not settings.distributed:
        fail("--queue needs a broker: set MARCO_BROKER_URL=redis://HOST:6379/0 (or drop --queue to run in-process)")
    if queue is False and settings.distributed:
        settings = QueueSettings(**{**settings.__dict__, "broker_url": None})
    dispatcher = make_dispatcher(settings)
    try:
        dispatcher.check()
    except BrokerUnavailable as exc:
        fail(f"{exc}; nothing was submitted")
    return dispatcher


def run_inline(store: Any, job_id: str) -> Any:
    """Run one stored job in this process (the same code path as a worker)."""
    from marco.jobs import BackendCache, execute_job

    return execute_job(store, job_id, BackendCache(), worker=f"local-{os.getpid()}")


def wait_batch(store: Any, batch_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = store.get_batch(batch_id).status
        if status not in ("queued", "running"):
            return status
        time.sleep(poll_s)


def _split(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(",") if x.strip()]


def _empty_dir_or_fail(path: Path | None, flag: str) -> None:
    if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
        fail(f"{path} exists and is not an empty directory; choose a new {flag}")


@app.command()
def synthesize(
    batch: Optional[list[str]] = typer.Option(None, "--batch", "-b", help="Source batch id or name (repeat or comma-separate; default: every batch)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only searches of this dataset (mgsm, flores200, ...)."),
    lang: Optional[str] = typer.Option(None, "--lang", "-l", help="Only these languages, e.g. en,zh."),
    correct_only: bool = typer.Option(False, "--correct-only", help="Keep paths whose answer is correct."),
    min_value: Optional[float] = typer.Option(None, "--min-value", help="Keep paths whose value (mean token confidence) is at least this."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="The k best paths (by value) of each problem instead of the chosen one."),
    dedup: str = typer.Option("exact", "--dedup", help="none | exact | near (MinHash)."),
    near_threshold: float = typer.Option(0.8, "--near-threshold", help="Jaccard similarity for --dedup near."),
    pairs: bool = typer.Option(False, "--pairs", help="Also build preference pairs (best correct vs best wrong path)."),
    step_pairs: bool = typer.Option(False, "--step-pairs", help="Also build sibling-step preference pairs from the trees (higher-Q step vs a lower-Q sibling, the shared prefix as prompt)."),
    pair_margin: float = typer.Option(0.1, "--pair-margin", help="With --step-pairs: the least Q difference that makes a pair."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the examples as a `datasets` directory."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Write the examples to this JSONL file."),
    pairs_out: Optional[Path] = typer.Option(None, "--pairs-out", help="Write the preference pairs as a `datasets` directory."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the synthesis run (default: synthesize-<id>)."),
    queue: Optional[bool] = typer.Option(None, "--queue/--in-process", help="Run on the `synthesize` queue (default when $MARCO_BROKER_URL is set)."),
    wait: bool = typer.Option(False, "--wait", help="With --queue: wait for the job and print its report."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
    db: str = DbOption,
) -> None:
    """Build CoT training examples in Marco-o1's format from stored searches.

    With no filter it takes the chosen path of every completed search. Example:
    marco synthesize --batch mgsm-en --correct-only --top-k 2 --out data/cot --jsonl data/cot.jsonl
    """
    from marco.store import StoreError
    from marco.synthesis import SynthesisConfig, plan_synthesis

    _empty_dir_or_fail(out, "--out")
    _empty_dir_or_fail(pairs_out, "--pairs-out")
    if pairs_out is not None and not (pairs or step_pairs):
        fail("--pairs-out needs --pairs or --step-pairs")
    try:
        config = SynthesisConfig(
            batches=_split(batch), dataset=dataset, langs=_split([lang] if lang else []), correct_only=correct_only,
            min_value=min_value, top_k=top_k, dedup=dedup, near_threshold=near_threshold, pairs=pairs,
            step_pairs=step_pairs, pair_margin=pair_margin,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc))
    store = open_store(db)
    dispatcher = queue_mode(queue)
    exports = {"out": str(out) if out else None, "jsonl": str(jsonl) if jsonl else None,
               "pairs_out": str(pairs_out) if pairs_out else None}  # fmt: skip
    try:
        run_id, job_id = plan_synthesis(store, config, name=name, exports=exports)
    except (StoreError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    err = Console(stderr=True)
    if dispatcher.distributed:
        dispatcher.enqueue([(job_id, "synthesize")])
        err.print(f"synthesis run {run_id} enqueued on `synthesize`", highlight=False)
        if not wait:
            typer.echo(run_id)
            return
        wait_batch(store, run_id)
    else:
        with err.status("synthesising…"):
            run_inline(store, job_id)
    batch_row = store.get_batch(run_id)
    if batch_row.status != "done":
        from marco.pipeline.report import _failure

        fail(f"synthesis run {run_id} {batch_row.status}: {_failure(store, run_id)}")
    result = (batch_row.config or {}).get("result") or {}
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    from marco.cli.tables import filter_report_table
    from marco.data.filters import FilterReport, StepStats

    report = FilterReport([StepStats(s["name"], s["seen"], s["removed"], [tuple(x) for x in s["samples"]])
                           for s in result["report"]["steps"]])  # fmt: skip
    Console().print(filter_report_table(report, f"synthesis {run_id}: {result['examples']} examples from "
                                          f"{result['searches']} searches of {result['problems']} problems"))
    typer.echo(f"synthesis run {run_id}: {result['examples']} examples, {result['pairs']} preference pairs "
               f"(train on them with `marco sft --data synthesis:{run_id}`)")
    for key, path in (result.get("exports") or {}).items():
        typer.echo(f"wrote {result.get('written', {}).get(key, 0)} rows to {path}")
