"""``marco solve``: search one question and print its answer, confidence, tokens and time."""

from __future__ import annotations

import json
import os
import time

import typer
from rich.console import Console

from marco.cli import app
from marco.cli import options as o
from marco.cli.db import DbOption, open_store
from marco.tasks import get_task
from marco.tasks.base import Problem


@app.command()
def solve(
    question: str = typer.Argument(..., help="The question to reason about."),
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
    task_name: str = typer.Option("mgsm", "--task", help="Prompt and answer format: mgsm (a number) or translation."),
    lang: str = typer.Option("en", "--lang", help="Language of the question (sets the answer instruction)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    db: str = DbOption,
) -> None:
    """Reason about one QUESTION with MCTS (or a baseline) and print the answer.

    Example: marco solve "Tom has 3 apples and buys 2 more. How many?" --strategy mcts --action ministep:32
    """
    from marco.jobs import BackendCache, execute_job
    from marco.cli.db import load_model

    config = o.SearchOptions(strategy, action, reflect, budget, n, children, temperature, select, seed, exploration,
                             top_p, reuse, cut_penalty, final_value, normalize, fill, widen, merge).config()
    task = get_task(task_name)
    problem = Problem(dataset="solve", lang=lang, index=0, question=question)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    store = open_store(db)
    with console.status(f"loading {model}…"):
        backend = load_model(model, store)
    plan = store.create_batch([problem], [config], model=model, task=task_name, name="solve")
    backends = BackendCache()
    backends.put(model, backend)
    results = []
    try:
        with console.status(f"searching ({config.label}, budget {budget} tokens)…"):
            outcome = execute_job(store, plan.job_ids[0], backends, worker=f"solve-{os.getpid()}", on_progress=results.append)
    finally:
        backends.close()  # a vLLM engine's core process (or the server started for it) ends with the command
    if outcome.status != "done" or not results:
        typer.echo(f"error: search failed: {outcome.error}", err=True)
        raise typer.Exit(1)
    r = results[0]
    out = {
        "answer": r.answer,
        "confidence": r.confidence,
        "tokens": r.tokens,
        "nodes": len(r.tree),
        "rounds": r.rounds,
        "strategy": config.label,
        "search_id": r.search_id,
        "seconds": round(r.elapsed_s, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "path": [r.tree.nodes[i].text for i in r.chosen_path[1:]],
    }
    if as_json:
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    text = "".join(out["path"])
    console = Console()
    console.print(f"[bold]{config.label}[/bold] · {r.tokens} tokens · {len(r.tree)} nodes · {r.elapsed_s:.1f}s")
    console.print(text, markup=False, highlight=False)
    conf = f"{r.confidence:.3f}" if r.confidence is not None else "-"
    console.print(f"[bold green]answer:[/bold green] {r.answer}   [bold]confidence:[/bold] {conf}")
