"""``marco compare``: strategies × budgets × seeds over the same problems, one stored batch, one table."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from marco.cli import app
from marco.cli import options as o
from marco.cli.db import DbOption, fail, open_store
from marco.cli.run import progress_bar, split_langs

NO_ACCURACY = ("translation", "flores200", "wmt22")


def print_comparison(comp: Any, console: Console, plot: Path | None = None) -> None:
    """The accuracy table, the paired tests and (with ``plot``) the PNG: shared by compare and report."""
    from marco.compare.render import accuracy_table, paired_table

    console.print(accuracy_table(comp))
    if comp.paired:
        console.print(paired_table(comp))
    elif any(r.strategy == comp.baseline for r in comp.rows):
        console.print(f"(no paired test yet: no strategy besides {comp.baseline} has finished searches)")
    else:
        console.print(f"(no paired test: the batch has no finished {comp.baseline} searches; try --baseline)")
    if comp.status in ("queued", "running"):
        console.print(f"(batch {comp.status}: partial results, from the searches finished so far)")
    if plot is not None:
        from marco.compare.plot import plot_comparison

        try:
            plot_comparison(comp, plot)
        except OSError as exc:
            fail(f"cannot write {plot}: {exc.strerror}")
        console.print(f"wrote {plot}")


@app.command()
def compare(
    dataset: str = typer.Option("arith", "--dataset", "-d",
                                help="mgsm | arith (generated tuning split) | arith-heldout | demo."),
    data_dir: str = typer.Option(None, "--data-dir", help="Data folder (default: $MARCO_DATA_DIR or ../shared/data)."),
    lang: str = typer.Option(None, "--lang", "-l", help="Comma-separated languages, e.g. en,zh (MGSM)."),
    limit: int = typer.Option(None, "--limit", help="Problems per language."),
    strategies: str = typer.Option(
        "greedy,sc,bon,mcts:ministep:32", "--strategies", "-s",
        help="Comma-separated specs, each NAME or NAME:ARG, optionally +reflect and /KEY=VALUE settings: "
        "greedy, sc, bon (sc:8 = at most 8 chains; default: as many as the budget pays), mcts:ministep:32, "
        "mcts:step, mcts:step+reflect; /KEY=VALUE sets any other search setting, "
        "e.g. mcts:ministep:32/k=4/c=0.5 (k children, c exploration, t temperature).",
    ),
    budgets: str = typer.Option("256,512,1024", "--budgets", "-b",
                                help="Comma-separated token budgets per problem; every strategy runs at each."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per sampled strategy (greedy is deterministic: one run)."),
    baseline: str = typer.Option("greedy", "--baseline",
                                 help="The strategy every other one is paired against, at the same budget."),
    temperature: float = o.Temperature,
    plot: Path = typer.Option(None, "--plot", help="Write accuracy vs spent tokens to this PNG."),
    markdown: Path = typer.Option(None, "--markdown", help="Also write both tables as markdown to this file."),
    model: str = o.Model,
    name: str = typer.Option(None, "--name", help="Batch name (default: dataset and id)."),
    chunk: int = typer.Option(64, "--chunk", help="Problems per job (searched in lockstep)."),
    queue: bool = typer.Option(False, "--queue", help="Enqueue the jobs for workers (needs $MARCO_BROKER_URL) "
                               "instead of running them here; see the table later with `marco report BATCH`."),
    db: str = DbOption,
) -> None:
    """Run every strategy at every budget (and seed) on the same problems; compare at equal spent tokens.

    Everything is one stored batch (`marco report BATCH` shows it again).

    The table: per strategy and budget, accuracy with a 95% Wilson score interval (n = problems; with
    several seeds a problem counts its mean over seeds), generated tokens actually spent per problem
    (a strategy may stop below its budget) and wall time.

    The paired table: each strategy against --baseline on the same problems: wins (problems it scores
    higher on), losses, ties, and the exact two-sided sign-test p (exact McNemar with one seed).

    Judge strategies at equal *spent* tokens, not equal budgets: the plot's x axis is spent tokens.

    Example: marco compare --dataset arith-heldout --limit 60 --strategies greedy,sc,bon,mcts:ministep:32
    --budgets 256,512,1024 --plot cmp.png
    """
    from marco.compare.spec import SpecError, parse_ints, parse_strategies, plan_runs, runs_metadata
    from marco.compare.table import build_comparison
    from marco.tasks import DataError, get_task

    console = Console()
    console.width = max(console.width, 120)  # the tables need it, also when piped to a file
    if dataset in NO_ACCURACY:
        fail(f"compare needs answers that are right or wrong (mgsm, arith, demo), not {dataset!r}; "
             "use `marco run` for translation")
    try:
        specs = parse_strategies(strategies)
        budget_list = parse_ints(budgets, "--budgets")
        runs = plan_runs(specs, budget_list, seeds, base={"temperature": temperature})
        if baseline not in [s.name for s in specs]:
            raise SpecError(f"--baseline {baseline!r} is not one of --strategies ({', '.join(s.name for s in specs)})")
        problems = get_task(dataset).load(data_dir, split_langs(lang), limit)
    except (SpecError, DataError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not problems:
        fail(f"no {dataset} problems found")
    for p in problems:
        if p.error:
            console.print(f"[yellow]skipped {p.key}:[/yellow] {p.error}")
    configs = [r.config for r in runs]
    extra = {"langs": split_langs(lang), "limit": limit,
             "compare": runs_metadata(runs, specs, budget_list, seeds, baseline)}
    store = open_store(db)
    good = sum(1 for p in problems if not p.error)
    console.print(f"{len(runs)} configs × {good} problems = {len(runs) * good} searches "
                  f"({', '.join(s.name for s in specs)} at budgets {', '.join(map(str, budget_list))})")

    if queue:
        plan = _enqueue(store, dataset, configs, model, data_dir, split_langs(lang), limit, chunk, name, extra, problems)
        console.print(f"batch [bold]{plan.batch_id}[/bold]: {len(plan.job_ids)} jobs enqueued · "
                      f"`marco status {plan.batch_id}` to follow, `marco report {plan.batch_id}` for the table")
        return

    from marco.cli.db import load_model
    from marco.jobs import BackendCache, execute_job

    with console.status(f"loading {model}…"):
        backend = load_model(model, store)
    plan = store.create_batch(problems, configs, model=model, task=dataset, chunk_size=chunk, name=name, extra=extra)
    backends = BackendCache()
    backends.put(model, backend)
    outcomes = []
    t0 = time.perf_counter()
    with progress_bar(console) as bar:
        job = bar.add_task(f"compare {dataset}", total=good * len(configs), acc="")
        solved = [0, 0]

        def tick(result: Any) -> None:
            solved[0] += 1
            solved[1] += 1 if result.correct else 0
            bar.update(job, advance=1, acc=f"{solved[1]}/{solved[0]} correct")

        for job_id in plan.job_ids:
            outcomes.append(execute_job(store, job_id, backends, worker=f"local-{os.getpid()}", on_progress=tick))
    console.print(f"batch {plan.batch_id} · {time.perf_counter() - t0:.0f}s · `marco report {plan.batch_id}` shows this again")
    comp = build_comparison(store, plan.batch_id, baseline)
    print_comparison(comp, console, plot)
    if markdown is not None:
        from marco.compare.render import markdown as to_markdown

        markdown.write_text(to_markdown(comp), encoding="utf-8")
    failed = [x for x in outcomes if x.status != "done"]
    for x in failed:
        console.print(f"[red]job {x.job_id} {x.status}:[/red] {x.error}")
    if failed:
        raise typer.Exit(1)


def _enqueue(store: Any, dataset: str, configs: list, model: str, data_dir: str | None, langs: list[str] | None,  # type: ignore[type-arg]
             limit: int | None, chunk: int, name: str | None, extra: dict[str, Any], problems: list) -> Any:  # type: ignore[type-arg]
    from marco.store import StoreError
    from scheduler.dispatch import BrokerUnavailable, make_dispatcher
    from scheduler.submit import SubmitRequest, submit
    from worker.settings import QueueSettings

    try:
        settings = QueueSettings.from_env()
    except ValueError as exc:
        fail(str(exc))
    if not settings.distributed:
        fail("--queue needs a broker: set MARCO_BROKER_URL=redis://HOST:6379/0 and start `marco worker` "
             "(or leave out --queue to run here)")
    try:
        request = SubmitRequest(task=dataset, configs=configs, model=model, data_dir=data_dir, langs=langs,
                                limit=limit, chunk=chunk, name=name, extra=extra)
        return submit(store, make_dispatcher(settings, store=store), request, problems)
    except (BrokerUnavailable, StoreError, ValueError) as exc:
        fail(f"{exc}; nothing was submitted")
