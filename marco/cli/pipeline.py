"""``marco pipeline run | status | resume | checkpoints``: the data loop as scheduler-driven stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store

# Registers the stage handlers with the scheduler's registry, so `marco scheduler` chains pipeline stages.
import marco.pipeline.stages  # noqa: E402,F401

pipeline_app = typer.Typer(help="Reason → synthesise → SFT → reason with the checkpoint → before/after report.",
                           no_args_is_help=True)  # fmt: skip
app.add_typer(pipeline_app, name="pipeline")


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else (f"{value:.3f}" if isinstance(value, float) else str(value))


def print_report(report: dict[str, Any]) -> None:
    console = Console()
    stages = Table(title=f"pipeline {report['pipeline_id']} ({report.get('name')}): {report['status']}")
    for col in ("stage", "status", "batch", "error"):
        stages.add_column(col, overflow="fold")
    for s in report["stages"]:
        stages.add_row(s["stage"], s["status"], (s["batch_id"] or "-")[:8], s.get("error") or "")
    console.print(stages)
    if report.get("training"):
        t = report["training"]
        losses = t["losses"]
        loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
        console.print(f"training run {t['training_run_id']}: {t['status']}, loss {loss}, model {t['model']}", highlight=False)
    if report.get("before") or report.get("after"):
        table = Table(title="test split: before (base) vs after (fine-tuned)")
        for col in ("", "accuracy", "mean confidence", "tokens/problem", "searches"):
            table.add_column(col, justify="right")
        for key in ("before", "after"):
            m = report.get(key)
            if m:
                table.add_row(key, _fmt(m["accuracy"], pct=True), _fmt(m["mean_confidence"]),
                              f"{m['tokens_per_problem']:.1f}", f"{m['done']}/{m['searches']}")  # fmt: skip
        console.print(table)


def _dispatcher(queue: Optional[bool], store: Any) -> Any:
    from marco.cli.synthesize import queue_mode

    dispatcher = queue_mode(queue)
    if not dispatcher.distributed:
        dispatcher.runtime._store = store  # inline jobs share this store
    return dispatcher


@pipeline_app.command("run")
def run_cmd(
    file: Path = typer.Argument(..., help="Pipeline YAML (see examples/pipeline.yaml)."),
    queue: Optional[bool] = typer.Option(None, "--queue/--in-process", help="Stages as queued jobs (default when $MARCO_BROKER_URL is set)."),
    wait: bool = typer.Option(False, "--wait", help="With --queue: tick a scheduler here until the pipeline ends."),
    as_json: bool = typer.Option(False, "--json", help="Print the final report as JSON."),
    db: str = DbOption,
) -> None:
    """Start a pipeline. In-process (no broker) it runs to the end and prints the before/after report; with
    a broker it enqueues the first stages and `marco scheduler` starts each next one."""
    from marco.pipeline import PipelineSpec
    from marco.pipeline.report import pipeline_report
    from marco.pipeline.service import drive, start
    from marco.store import StoreError
    from marco.tasks import DataError

    try:
        spec = PipelineSpec.from_yaml(file)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    store = open_store(db)
    dispatcher = _dispatcher(queue, store)
    err = Console(stderr=True)
    try:
        with err.status(f"pipeline {spec.name}: first stages…"):
            pipeline_id = start(store, dispatcher, spec)
    except (DataError, ValueError, FileNotFoundError, StoreError) as exc:
        fail(str(exc).splitlines()[0])
    err.print(f"pipeline {pipeline_id} started (`marco pipeline status {pipeline_id}`)", highlight=False)
    if dispatcher.distributed and not wait:
        typer.echo(pipeline_id)
        return

    def show(status: dict[str, Any]) -> None:
        now = ", ".join(f"{s['stage']}={s['status']}" for s in status["stages"])
        err.print(f"  {now}", highlight=False)

    drive(store, dispatcher, pipeline_id, on_tick=show, poll_s=2.0 if dispatcher.distributed else 0.0)
    report = pipeline_report(store, pipeline_id)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_report(report)
    if report["status"] != "done":
        fail(f"pipeline {pipeline_id} stopped at {report.get('failed_stage')}: {report.get('error')} "
             f"(fix it, then `marco pipeline resume {pipeline_id}`)")  # fmt: skip


@pipeline_app.command("status")
def status_cmd(
    pipeline_id: str = typer.Argument(..., help="Pipeline id."),
    as_json: bool = typer.Option(False, "--json"),
    db: str = DbOption,
) -> None:
    """Each stage's status, the failed stage's reason, and the before/after report once it exists."""
    from marco.pipeline.report import pipeline_report
    from marco.store import StoreError

    store = open_store(db)
    try:
        report = pipeline_report(store, pipeline_id)
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_report(report)


@pipeline_app.command("resume")
def resume_cmd(
    pipeline_id: str = typer.Argument(..., help="Pipeline id."),
    queue: Optional[bool] = typer.Option(None, "--queue/--in-process"),
    as_json: bool = typer.Option(False, "--json"),
    db: str = DbOption,
) -> None:
    """Requeue a failed pipeline's failed stage (searches continue from their stored nodes) and carry on."""
    from marco.pipeline.report import pipeline_report
    from marco.pipeline.service import drive, resume
    from marco.store import StoreError

    store = open_store(db)
    dispatcher = _dispatcher(queue, store)
    try:
        ids = resume(store, dispatcher, pipeline_id)
    except (StoreError, ValueError) as exc:
        fail(str(exc))
    Console(stderr=True).print(f"pipeline {pipeline_id}: {len(ids)} job(s) requeued", highlight=False)
    if dispatcher.distributed:
        return
    drive(store, dispatcher, pipeline_id)
    report = pipeline_report(store, pipeline_id)
    typer.echo(json.dumps(report)) if as_json else print_report(report)
    if report["status"] != "done":
        fail(f"pipeline {pipeline_id} stopped at {report.get('failed_stage')}: {report.get('error')}")


@pipeline_app.command("checkpoints")
def checkpoints_cmd(limit: int = typer.Option(20, "--limit"), db: str = DbOption) -> None:
    """Registered checkpoints with their lineage (base model, data, training run)."""
    store = open_store(db)
    table = Table()
    for col in ("model", "name", "parent", "data", "training run", "path"):
        table.add_column(col, overflow="fold")
    for m in store.checkpoints(limit):
        meta = m.meta or {}
        table.add_row(f"checkpoint:{m.id}", m.name, str(m.parent_id or "-")[:8], str(meta.get("dataset", "-")),
                      str(meta.get("training_run_id", "-"))[:8], m.path or "-")  # fmt: skip
    Console().print(table)
