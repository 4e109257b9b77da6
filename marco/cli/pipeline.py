"""``marco pipeline run | status | resume | checkpoints``: expert iteration and the evaluation matrix as
scheduler-driven stages."""

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

pipeline_app = typer.Typer(help="Expert iteration (search → synthesise → SFT, N rounds) and the evaluation matrix.",
                           no_args_is_help=True)  # fmt: skip
app.add_typer(pipeline_app, name="pipeline")


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else (f"{value:.3f}" if isinstance(value, float) else str(value))


def print_report(report: dict[str, Any]) -> None:
    from marco.compare.render import matrix_table

    console = Console()
    console.width = max(console.width, 140)  # the table needs it, also when piped to a file
    stages = Table(title=f"pipeline {report['pipeline_id']} ({report.get('name')}): {report['status']}")
    for col in ("stage", "status", "batch", "error"):
        stages.add_column(col, overflow="fold")
    for s in report["stages"]:
        stages.add_row(s["stage"], s["status"], (s["batch_id"] or "-")[:8], s.get("error") or "")
    console.print(stages)
    for r in report.get("rounds", []):
        search, synth, t = r.get("search"), r.get("synthesis"), r.get("training")
        parts = [f"round {r['round']}:"]
        if search:
            parts.append(f"search {_fmt(search['accuracy'], pct=True)} right with {search.get('model')}")
        if synth:
            parts.append(f"{synth.get('examples')} examples synthesised")
        if t:
            losses = t["losses"]
            loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
            parts.append(f"training {t['status']} from {t['base']}, loss {loss}, model {t['model']}")
        console.print(", ".join(parts), highlight=False)
    if report.get("table"):
        console.print(matrix_table(report["table"], title=f"{report.get('name')}: evaluation"))


def write_table(report: dict[str, Any], as_json: Optional[Path], markdown: Optional[Path], plot: Optional[Path]) -> None:
    """The table as a JSON list of rows, as markdown, and as the accuracy-vs-tokens plot."""
    from marco.compare.plot import plot_matrix
    from marco.compare.render import matrix_markdown

    try:
        if as_json is not None:
            as_json.write_text(json.dumps(report["table"], indent=2), encoding="utf-8")
        if markdown is not None:
            markdown.write_text(matrix_markdown(report["table"], title=report.get("name")), encoding="utf-8")
        if plot is not None:
            plot_matrix(report["table"], plot)
    except OSError as exc:
        fail(f"cannot write {exc.filename}: {exc.strerror}")


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
    as_json: Optional[Path] = typer.Option(None, "--json", help="Write the table as a JSON list of rows (model, "
                                           "strategy, dataset, lang, budget, n, correct, accuracy, ci_low, ci_high, "
                                           "tokens_spent, mean_depth, paired tests) to this file."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as markdown to this file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write accuracy vs tokens spent to this PNG."),
    db: str = DbOption,
) -> None:
    """Start a pipeline: N rounds of expert iteration (search the training split with the newest model →
    synthesise → SFT), then the evaluation matrix (models × strategies × budgets × datasets). In-process (no
    broker) it runs to the end and prints the table (accuracy with 95% Wilson intervals, tokens spent, exact
    paired tests against the base and the trained model's greedy rows); with a broker it enqueues the first
    stages and `marco scheduler` starts each next one (`marco pipeline status ID` shows the table).

    The pipeline refuses to train on an evaluation split (mgsm, arith-heldout, arith-hard, ...) or on the
    tuning split arith: train on arith-train. Example: marco pipeline run examples/table-small.yaml --json table.json"""
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
    print_report(report)
    write_table(report, as_json, markdown, plot)
    if report["status"] != "done":
        fail(f"pipeline {pipeline_id} stopped at {report.get('failed_stage')}: {report.get('error')} "
             f"(fix it, then `marco pipeline resume {pipeline_id}`)")  # fmt: skip


@pipeline_app.command("status")
def status_cmd(
    pipeline_id: str = typer.Argument(..., help="Pipeline id."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report (stages, rounds, table) as JSON."),
    db: str = DbOption,
) -> None:
    """Each stage's status, the failed stage's reason, each round, and the table of the evaluations done."""
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
