"""``marco run``: search a dataset in-process and print the results table."""

from __future__ import annotations

import os
import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from marco.cli import app
from marco.cli import options as o
from marco.cli.db import DbOption, open_store
from marco.runner import RunSummary, summarize
from marco.tasks import DataError, get_task, task_name


def split_langs(lang: str | None) -> list[str] | None:
    return [x.strip() for x in lang.split(",") if x.strip()] if lang else None


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def results_table(summary: RunSummary) -> Table:
    metrics = sorted({k for row in summary.rows for k in row.metrics})
    table = Table(title=f"{summary.label} · {summary.wall_s:.1f}s wall")
    table.add_column("lang")
    table.add_column("problems", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    table.add_column("tokens/problem", justify="right")
    table.add_column("confidence", justify="right")
    table.add_column("failed rows", justify="right")
    for row in summary.rows:
        vals = [f"{100 * row.metrics[m]:.1f}" if m == "accuracy" else f"{row.metrics[m]:.1f}" for m in metrics if m in row.metrics]
        conf = f"{row.mean_confidence:.3f}" if row.mean_confidence is not None else "-"
        table.add_row(row.lang, str(row.problems), *vals, f"{row.tokens_per_problem:.0f}", conf, str(row.failed))
    return table


@app.command()
def run(
    dataset: str = typer.Option("demo", "--dataset", "-d", help="mgsm | translation | demo (see `marco data list`)."),
    testset: str = o.Testset,
    data_dir: str = o.DataDir,
    lang: str = typer.Option(None, "--lang", "-l", help="Comma-separated languages, e.g. en,zh (MGSM: 11 languages)."),
    limit: int = typer.Option(None, "--limit", help="Problems per language."),
    strategy: str = o.Strategy,
    action: str = o.Action,
    reflect: bool = o.Reflect,
    budget: int = o.Budget,
    n: str = o.N,
    children: int = o.Children,
    temperature: float = o.Temperature,
    select: str = o.Select,
    seed: int = o.Seed,
    exploration: float = o.Exploration,
    top_p: float = o.TopP,
    reuse: bool = o.Reuse,
    cut_penalty: float = o.CutPenalty,
    final_value: str = o.FinalValue,
    normalize: bool = o.Normalize,
    fill: bool = o.Fill,
    widen: bool = o.Widen,
    merge: bool = o.Merge,
    model: str = o.Model,
    db: str = DbOption,
    chunk: int = typer.Option(64, "--chunk", help="Problems per job of the stored batch (searched in lockstep)."),
) -> None:
    """Search a dataset in lockstep and print accuracy (or chrF/BLEU) per language, tokens and time.

    All problems advance together: one batched model call per round (continuous batching on backends
    that support it). Every run is stored as a batch (see --db) for `marco traces` and `marco report`.

    MGSM and FLORES-200 zh-en ship with marco (no --data-dir needed); `marco data list` shows every dataset.

    Example: marco run --dataset mgsm --lang en,zh --limit 8 --strategy mcts --action ministep:32
    """
    from marco.jobs import BackendCache, execute_job
    from marco.cli.db import load_model

    config = o.SearchOptions(strategy, action, reflect, budget, n, children, temperature, select, seed, exploration,
                             top_p, reuse, cut_penalty, final_value, normalize, fill, widen, merge).config()
    console = Console()
    try:
        dataset = task_name(dataset, testset)
        task = get_task(dataset)
        problems = task.load(data_dir, split_langs(lang), limit)
    except (DataError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    good = [p for p in problems if not p.error]
    for p in problems:
        if p.error:
            console.print(f"[yellow]skipped {p.key}:[/yellow] {p.error}")
    store = open_store(db)
    with console.status(f"loading {model}…"):
        backend = load_model(model, store)
    # Every run is a stored batch (its problems, jobs and searches), executed job by job in-process through
    # the same code path as the queue workers.
    plan = store.create_batch(problems, [config], model=model, task=dataset, chunk_size=chunk)
    backends = BackendCache()
    backends.put(model, backend)
    t0 = time.perf_counter()
    results = []
    outcomes = []
    with progress_bar(console) as bar:
        job = bar.add_task(f"{dataset} {config.label}", total=len(good), acc="")
        solved = [0, 0]

        def tick(result) -> None:  # type: ignore[no-untyped-def]
            results.append(result)
            solved[0] += 1
            solved[1] += 1 if result.correct else 0
            bar.update(job, advance=1, acc=f"{solved[1]}/{solved[0]} correct")

        try:
            for job_id in plan.job_ids:
                outcomes.append(execute_job(store, job_id, backends, worker=f"local-{os.getpid()}", on_progress=tick))
        except ConnectionError as exc:  # the model server went away: the job is back in the queue, nothing lost
            console.print(f"[red]error:[/red] {exc}\nbatch {plan.batch_id} is kept (finished searches and stored "
                          f"nodes stay); when the server is back: marco retry {plan.batch_id} --db {db or '$MARCO_DATABASE_URL'}")
            raise typer.Exit(1) from None
        finally:
            backends.close()  # a vLLM engine's core process (or the server started for it) ends with the command
    wall = time.perf_counter() - t0
    summary = summarize(task, config.label, problems, results, wall)
    console.print(results_table(summary))
    store_s = sum(x.store_s for x in outcomes)
    console.print(f"batch {plan.batch_id} · store writes {store_s:.2f}s of {wall:.1f}s wall "
                  f"({100 * store_s / wall if wall else 0:.2f}%) · see `marco report {plan.batch_id}`")
    failed = [x for x in outcomes if x.status != "done"]
    for x in failed:
        console.print(f"[red]job {x.job_id} {x.status}:[/red] {x.error}")
    if failed:
        raise typer.Exit(1)
