"""``marco export BATCH --parquet DIR``: a stored batch as Parquet files for pandas, DuckDB or `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store


@app.command("export")
def export_cmd(
    batch: str = typer.Argument(..., help="Batch id or name (see `marco status` or `marco traces list`)."),
    parquet: Path = typer.Option(..., "--parquet", help="Directory to write problems.parquet, searches.parquet, nodes.parquet into."),
    chunk: int = typer.Option(5000, "--chunk", help="Rows read and written at a time (memory stays bounded by this)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing .parquet files in the directory."),
    as_json: bool = typer.Option(False, "--json", help="Print rows and files as JSON."),
    db: str = DbOption,
) -> None:
    """Export a batch's problems, searches and every tree node as Parquet, streamed in chunks.

    Nodes keep per-token confidences as list<double> and token ids as list<int32>; join nodes.search_id to
    searches.id and searches.problem_id to problems.id. Example:
    marco export mgsm-en --parquet out/mgsm-en && duckdb -c "select kind, avg(value) from 'out/mgsm-en/nodes.parquet' group by 1"
    """
    from marco.store import StoreError
    from marco.store.export import count_rows, export_parquet

    if chunk <= 0:
        fail("--chunk must be a positive number of rows")
    store = open_store(db)
    try:
        batch_id = store.resolve_batch(batch)
        totals = count_rows(store, batch_id)
    except StoreError as exc:
        fail(str(exc))
    err = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:  # fmt: skip
        tasks = {t: bar.add_task(t, total=n) for t, n in totals.items()}
        try:
            result = export_parquet(store, batch_id, parquet, chunk=chunk, overwrite=overwrite,
                                    on_rows=lambda table, n: bar.advance(tasks[table], n))  # fmt: skip
        except FileExistsError as exc:
            fail(f"{exc} (pass --overwrite)")
        except (StoreError, OSError) as exc:
            fail(str(exc).splitlines()[0])
    if as_json:
        typer.echo(json.dumps({"batch_id": result.batch_id, "rows": result.rows, "files": result.files}))
        return
    for table, path in result.files.items():
        typer.echo(f"{result.rows[table]:>10} {table:<9} -> {path}")
