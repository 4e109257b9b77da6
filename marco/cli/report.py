"""``marco report BATCH``: the paper-style results table of a stored batch, as text, JSON or a plot."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store
from marco.store.db import StoreError


@app.command("report")
def report(
    batch: str = typer.Argument(..., help="Batch id or name."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Path = typer.Option(None, "--plot", help="Also write accuracy vs tokens spent to this PNG."),
    baseline: str = typer.Option(None, "--baseline", help="`marco compare` batches: pair every strategy against "
                                 "this one (default: the batch's, usually greedy)."),
    markdown: Path = typer.Option(None, "--markdown", help="`marco compare` batches: also write the tables as "
                                  "markdown to this file."),
    db: str = DbOption,
) -> None:
    """Rows: strategy/action; columns: languages; plus tokens and seconds per problem.

    A batch written by `marco compare` shows its comparison instead: accuracy with 95% intervals, tokens
    spent and wall time per strategy and budget, and the paired tests against the baseline."""
    from marco.report.tables import batch_report, format_metric

    store = open_store(db)
    if _show_comparison(store, batch, as_json, plot, baseline, markdown):
        return
    try:
        rep = batch_report(store, store.resolve_batch(batch))
    except StoreError as exc:
        fail(str(exc))
    if plot is not None:
        from marco.report.plot import plot_accuracy_vs_tokens

        try:
            plot_accuracy_vs_tokens(rep, plot)
        except OSError as exc:
            fail(f"cannot write {plot}: {exc.strerror}")
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), ensure_ascii=False, indent=2))
        return
    unit = " (%)" if rep.metric == "accuracy" else ""
    wall = f" · {rep.wall_s:.1f}s wall" if rep.wall_s is not None else ""
    table = Table(title=f"{rep.name} · {rep.dataset} · {rep.metric}{unit} · {rep.status}{wall}")
    table.add_column("strategy/action")
    for lang in rep.langs:
        table.add_column(lang, justify="right")
    table.add_column("all", justify="right")
    for col in ("problems", "failed", "tokens/problem", "s/problem"):
        table.add_column(col, justify="right")
    for row in rep.rows:
        table.add_row(
            row.label, *(format_metric(row.cells.get(lang), rep.metric) for lang in rep.langs),
            format_metric(row.overall, rep.metric), str(row.problems), str(row.failed),
            f"{row.tokens_per_problem:.0f}", f"{row.seconds_per_problem:.2f}",
        )
    Console(width=max(100, 30 + 9 * len(rep.langs) + 50)).print(table)
    if plot is not None:
        typer.echo(f"wrote {plot}")


def _show_comparison(store, batch: str, as_json: bool, plot: Path | None, baseline: str | None,  # type: ignore[no-untyped-def]
                     markdown: Path | None = None) -> bool:
    """Print a `marco compare` batch as its comparison; False for any other batch."""
    from marco.cli.compare import print_comparison
    from marco.compare.table import build_comparison, is_comparison

    try:
        batch_id = store.resolve_batch(batch)
        if not is_comparison(store.get_batch(batch_id).config):
            return False
        comp = build_comparison(store, batch_id, baseline)
    except StoreError as exc:
        fail(str(exc))
    if markdown is not None:
        from marco.compare.render import markdown as to_markdown

        markdown.write_text(to_markdown(comp), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(comp.to_dict(), ensure_ascii=False, indent=2))
        if plot is not None:
            from marco.compare.plot import plot_comparison

            plot_comparison(comp, plot)
        return True
    print_comparison(comp, Console(width=120), plot)
    return True
