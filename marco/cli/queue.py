"""Distributed batches: ``marco worker | flower | submit | status | cancel | retry | scheduler``.

The broker is ``$MARCO_BROKER_URL`` (Redis); the store is ``--db`` or ``$MARCO_DATABASE_URL``. With no broker
configured, ``submit`` runs the batch's jobs in this process through the same task code.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, NoReturn

import typer
from rich.console import Console

from marco.cli import app
from marco.cli import options as o

console = Console()
err = Console(stderr=True)

Db = typer.Option(None, "--db", envvar="MARCO_DATABASE_URL", help="Store URL (default $MARCO_DATABASE_URL or sqlite:///marco.db).")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _open_store(db: str | None) -> Any:
    from marco.store import Store, StoreError

    try:
        return Store.open(db)
    except StoreError as exc:
        _fail(str(exc))


def _settings() -> Any:
    from worker.settings import QueueSettings

    try:
        return QueueSettings.from_env()
    except ValueError as exc:
        _fail(str(exc))


def _refuse_placeholders(urls: dict[str, str | None]) -> None:
    """Exit before connecting when a URL holds a placeholder password (see worker/credentials.py)."""
    from worker.credentials import refusal, url_problem

    problems = [p for p in (url_problem(name, url) for name, url in urls.items()) if p]
    if problems:
        _fail(refusal(problems))


@app.command()
def worker(
    queues: str = typer.Option("reason,synthesize,train", "--queues", "-Q", help="Comma-separated: reason, synthesize, train."),
    concurrency: int = typer.Option(1, "--concurrency", "-c", help="Worker processes; each loads its own model."),
    name: str = typer.Option("marco@%h", "--name", "-n", help="Node name (%h: host name); unique per host."),
    pool: str = typer.Option("prefork", "--pool", help="prefork (default) | solo | threads."),
    preload: str = typer.Option("", "--preload", help="Model specs each process loads at start, e.g. smollm2."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
) -> None:
    """Start a Celery worker on $MARCO_BROKER_URL that runs jobs from the given queues.

    Example: MARCO_BROKER_URL=redis://host:6379/0 MARCO_DATABASE_URL=postgresql://host/marco marco worker -Q reason -c 1
    """
    import os

    from worker.launch import worker_argv

    settings = _settings()
    if not settings.distributed:
        _fail("no broker configured: set MARCO_BROKER_URL=redis://HOST:6379/0 (without one, `marco submit` runs jobs in-process)")
    if not settings.database_url:
        _fail("no store configured: set MARCO_DATABASE_URL to the database jobs are submitted to "
              "(e.g. postgresql://HOST/marco); a worker never falls back to ./marco.db")
    _refuse_placeholders({"MARCO_BROKER_URL": settings.broker_url, "MARCO_DATABASE_URL": settings.database_url})
    try:
        argv = worker_argv(queues, concurrency, name, pool, loglevel)
    except ValueError as exc:
        _fail(str(exc))
    if preload:
        os.environ["MARCO_PRELOAD_MODELS"] = preload
    from worker.app import app as celery_app
    from worker.app import preload_alive_timeout

    celery_app.conf.worker_proc_alive_timeout = preload_alive_timeout(settings)

    celery_app.worker_main(argv)


@app.command()
def flower(
    port: int = typer.Option(5555, "--port"),
    address: str = typer.Option("127.0.0.1", "--address", help="Interface to listen on; /metrics and /healthcheck skip basic auth, so reach Flower from elsewhere through a proxy (docs/operations.md)."),
    basic_auth: str = typer.Option(None, "--basic-auth", envvar="FLOWER_BASIC_AUTH", help="user:password (required; placeholders such as change-me are refused). Prefer $FLOWER_BASIC_AUTH: a flag shows in `ps`."),
) -> None:
    """Start Flower (the Celery monitor) on the broker, with basic auth."""
    import os

    from worker.launch import flower_argv, flower_env

    settings = _settings()
    if not settings.distributed:
        _fail("no broker configured: set MARCO_BROKER_URL=redis://HOST:6379/0")
    _refuse_placeholders({"MARCO_BROKER_URL": settings.broker_url})
    try:
        argv = flower_argv(port, address, basic_auth)
    except ValueError as exc:
        _fail(str(exc))
    os.environ.update(flower_env(basic_auth))  # Flower reads it there; never on its command line
    from worker.app import app as celery_app

    celery_app.start(argv)


@app.command()
def submit(
    dataset: str = typer.Argument(..., help="mgsm | translation | demo (see `marco data list`)."),
    testset: str = o.Testset,
    data_dir: str = o.DataDir,
    lang: str = typer.Option(None, "--lang", "--langs", "-l", help="Comma-separated languages, e.g. en,zh."),
    limit: int = typer.Option(None, "--limit", help="Problems per language."),
    chunk: int = typer.Option(8, "--chunk", "-k", help="Problems per job."),
    strategy: str = o.Strategy,
    action: str = o.Action,
    reflect: bool = o.Reflect,
    budget: int = o.Budget,
    n: str = o.N,
    children: int = typer.Option(3, "--children", help="Children per MCTS expansion."),
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
    name: str = typer.Option(None, "--name", help="Batch name (default: dataset and id)."),
    priority: int = typer.Option(0, "--priority", help="0-9, higher runs first."),
    wait: bool = typer.Option(False, "--wait", help="Show a live progress bar until the batch ends."),
    db: str = Db,
) -> None:
    """Plan a batch (chunks of --chunk problems), write it to the store and enqueue one message per job.

    The problems are read here (shipped data, or --data-dir) and stored with the batch: workers need no data.

    Example: marco submit mgsm --lang en,zh --limit 50 --chunk 5 --strategy mcts --action ministep:32 --wait
    """
    from marco.store import StoreError
    from marco.tasks import DataError, task_name
    from scheduler.dispatch import BrokerUnavailable, make_dispatcher
    from scheduler.submit import SubmitRequest, check_model, load_problems
    from scheduler.submit import submit as do_submit

    config = o.SearchOptions(strategy, action, reflect, budget, n, children, temperature, select, seed, exploration,
                             top_p, reuse, cut_penalty, final_value, normalize, fill, widen, merge).config()
    langs = [x.strip() for x in lang.split(",") if x.strip()] if lang else None
    try:
        request = SubmitRequest(
            task=task_name(dataset, testset), configs=[config], model=model, data_dir=data_dir, langs=langs, limit=limit,
            chunk=chunk, name=name, priority=priority,
        )
        problems = load_problems(request)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except OSError as exc:  # unreadable data file (permissions, I/O error)
        _fail(f"cannot read the data: {exc}; nothing was submitted")
    settings = _settings()
    store = _open_store(db)
    try:
        check_model(store, model)  # an unknown model or checkpoint:ID fails here, before anything is written
    except (StoreError, ValueError) as exc:
        _fail(f"{exc}; nothing was submitted")
    dispatcher = make_dispatcher(settings, store=store)
    try:
        dispatcher.check()
    except BrokerUnavailable as exc:
        _fail(f"{exc}; nothing was submitted")
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # a large batch is written and enqueued in chunks (workers start on the first): show how far it is
    with Progress(TextColumn("submitting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=len(problems) < 20_000) as bar:
        task = bar.add_task("submit", total=len(problems))
        try:
            plan = do_submit(store, dispatcher, request, problems, progress=lambda done, _: bar.update(task, completed=done))
        except (BrokerUnavailable, StoreError) as exc:
            _fail(f"{exc}; nothing was submitted")
    where = "enqueued" if dispatcher.distributed else "ran in-process"
    console.print(
        f"batch [bold]{plan.batch_id}[/bold]: {len(plan.problem_ids)} problems, {len(plan.job_ids)} jobs "
        f"{where} in {time.perf_counter() - t0:.2f}s",
        highlight=False,
    )
    if wait and dispatcher.distributed:
        _wait(store, plan.batch_id)
    elif not dispatcher.distributed:
        _print_status(store, [plan.batch_id])


def _wait(store: Any, batch_id: str, poll_s: float = 1.0) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from scheduler.progress import snapshot

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), console=console,
    ) as bar:
        snap = snapshot(store, batch_id)
        task = bar.add_task(snap.name, total=snap.searches_total, info="")
        while True:
            snap = snapshot(store, batch_id)
            acc = "-" if snap.accuracy is None else f"{snap.accuracy:.1%}"
            jobs = snap.jobs
            info = f"jobs {jobs['done']}/{sum(jobs.values())} done, {jobs['running']} running, {jobs['failed']} failed · acc {acc}"
            bar.update(task, completed=snap.searches_ended, info=info)
            if snap.ended:
                break
            time.sleep(poll_s)
    _print_status(store, [batch_id])


def _print_status(store: Any, batch_ids: list[str], as_json: bool = False, fleet: bool = False) -> None:
    from scheduler.progress import fleet_snapshot, fleet_table, snapshot, table

    snaps = [snapshot(store, b) for b in batch_ids]
    queues = fleet_snapshot(store) if fleet else None
    if as_json:
        # without --fleet: the list of batches, as before; with it, {"batches": [...], "fleet": {...}}
        batches = [s.to_dict() for s in snaps]
        console.print_json(json.dumps({"batches": batches, "fleet": queues.to_dict()} if queues else batches))
    else:
        console.print(table(snaps))
        if queues is not None:
            console.print(fleet_table(queues))


@app.command()
def status(
    batch: str = typer.Argument(None, help="Batch id (default: the most recent batches)."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until interrupted (or the batch ends)."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes with --watch."),
    limit: int = typer.Option(10, "--limit", help="Batches listed without BATCH."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    fleet: bool = typer.Option(None, "--fleet/--no-fleet", help="(default: on, off with --json) Also show each queue's depth, running jobs, oldest queued job, workers holding leases, re-sends and lost leases (the scheduler's marco_queue_* metrics)."),
    db: str = Db,
) -> None:
    """Jobs queued/running/done/failed, searches finished, accuracy so far, tokens, throughput and ETA;
    below, the queues (the same headline numbers the scheduler exports on $MARCO_METRICS_PORT)."""
    from rich.console import Group
    from rich.live import Live

    from marco.store import StoreError
    from scheduler.progress import fleet_snapshot, fleet_table, snapshot, table

    store = _open_store(db)

    def ids() -> list[str]:
        return [batch] if batch else [str(b.id) for b in store.batches(limit)]

    try:
        if not watch:
            _print_status(store, ids(), as_json, fleet=fleet if fleet is not None else not as_json)
            return

        def view(snaps: list[Any]) -> Any:
            return Group(table(snaps), fleet_table(fleet_snapshot(store))) if fleet is not False else table(snaps)

        with Live(view([snapshot(store, b) for b in ids()]), console=console, refresh_per_second=4) as live:
            while True:
                snaps = [snapshot(store, b) for b in ids()]
                live.update(view(snaps))
                if batch and snaps[0].ended:
                    break
                time.sleep(interval)
    except StoreError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass


@app.command()
def cancel(batch: str = typer.Argument(..., help="Batch id."), db: str = Db) -> None:
    """Cancel a batch: its queued jobs are skipped, running ones stop within one round."""
    from marco.store import StoreError

    store = _open_store(db)
    try:
        n = store.cancel_batch(batch)
    except StoreError as exc:
        _fail(str(exc))
    console.print(f"batch {batch}: {n} job(s) cancelled", highlight=False)


@app.command()
def retry(
    batch: str = typer.Argument(..., help="Batch id."),
    failed: bool = typer.Option(False, "--failed", help="Also put failed jobs back in the queue."),
    db: str = Db,
) -> None:
    """Re-send the messages of a batch's queued jobs; with --failed, requeue its failed jobs first.
    Searches resume from the nodes already stored."""
    from marco.store import StoreError
    from scheduler.dispatch import BrokerUnavailable, make_dispatcher
    from scheduler.submit import enqueue_jobs

    store = _open_store(db)
    dispatcher = make_dispatcher(_settings(), store=store)
    try:
        dispatcher.check()
        requeued = store.requeue_failed(batch) if failed else []
        queued = [str(j.id) for j in store.queued_jobs(batch)]
        enqueue_jobs(store, dispatcher, queued, priority=store.get_batch(batch).priority)
    except (StoreError, BrokerUnavailable) as exc:
        _fail(str(exc))
    console.print(f"batch {batch}: {len(requeued)} failed job(s) requeued, {len(queued)} message(s) sent", highlight=False)


@app.command()
def scheduler(
    interval: float = typer.Option(10.0, "--interval", help="Seconds between passes."),
    once: bool = typer.Option(False, "--once", help="One pass, then exit (cron, tests)."),
    max_attempts: int = typer.Option(5, "--max-attempts", help="A job whose worker died this many times fails."),
    stale_queued: float = typer.Option(
        300.0, "--stale-queued", envvar="MARCO_STALE_QUEUED_SECONDS",
        help="Re-send a job queued this many seconds since its message was sent and never claimed (lost message).",
    ),
    db: str = Db,
) -> None:
    """Re-enqueue jobs whose lease expired, re-send jobs whose message was lost, close finished batches and
    start the next pipeline stage."""
    from scheduler.dispatch import BrokerUnavailable, make_dispatcher
    from scheduler.service import Scheduler, SchedulerConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings()
    from marco import metrics

    try:
        metrics.serve_from_env()  # $MARCO_METRICS_PORT: this scheduler's metrics (queue depth, ticks, re-sends)
    except ValueError as exc:
        _fail(str(exc))
    _refuse_placeholders({"MARCO_BROKER_URL": settings.broker_url, "--db / MARCO_DATABASE_URL": db})
    store = _open_store(db)
    dispatcher = make_dispatcher(settings, store=store)
    service = Scheduler(store, dispatcher, SchedulerConfig(interval_s=interval, max_attempts=max_attempts, stale_queued_s=stale_queued))
    if once:
        try:
            dispatcher.check()
            report = service.tick()
        except BrokerUnavailable as exc:
            _fail(str(exc))
        console.print_json(json.dumps(report.__dict__))
        return
    try:
        service.run()
    except KeyboardInterrupt:
        pass
