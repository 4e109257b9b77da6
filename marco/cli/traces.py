"""``marco traces``: list stored searches, show a tree, print a reasoning path, draw a tree as HTML."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store
from marco.store.db import StoreError

traces_app = typer.Typer(help="Read stored searches: list, show, path, tree --html.", no_args_is_help=True)
app.add_typer(traces_app, name="traces")


@traces_app.command("list")
def list_(
    batch: str = typer.Option(None, "--batch", help="Batch id or name."),
    dataset: str = typer.Option(None, "--dataset", help="mgsm, flores200, wmt22, demo, solve..."),
    lang: str = typer.Option(None, "--lang", help="Language code, e.g. en."),
    strategy: str = typer.Option(None, "--strategy", help="greedy | sc | bon | mcts, or a full label like mcts/ministep:32."),
    correct: bool = typer.Option(None, "--correct/--wrong", help="Only correct (or only wrong) answers."),
    limit: int = typer.Option(50, "--limit", help="At most this many rows (newest first)."),
    db: str = DbOption,
) -> None:
    """A table of stored searches matching every filter given."""
    store = open_store(db)
    try:
        rows = store.find_searches(batch, dataset, lang, strategy, correct, limit)
    except StoreError as exc:
        fail(str(exc))
    table = Table(title=f"{len(rows)} searches")
    for col in ("search", "batch", "problem", "strategy", "status", "answer", "correct", "tokens", "seconds"):
        table.add_column(col, overflow="fold", justify="right" if col in ("tokens", "seconds") else "left")
    for r in rows:
        verdict = "-" if r.correct is None else ("yes" if r.correct else "no")
        table.add_row(
            str(r.id), str(r.batch_id)[:8], f"{r.dataset}/{r.lang}", r.label, r.status,
            r.final_answer if r.final_answer is not None else (r.error or "-"), verdict, str(r.tokens),
            f"{r.elapsed_s:.1f}",
        )
    Console(width=200).print(table)


@traces_app.command("show")
def show(
    search: str = typer.Argument(..., help="Search id (see `marco traces list`)."),
    width: int = typer.Option(60, "--width", help="Characters of each node's text to show."),
    db: str = DbOption,
) -> None:
    """The search tree as indented text: kind, confidence, value, visits, a text excerpt; * marks the
    chosen path."""
    from marco.report.tree_text import tree_lines

    row, problem, nodes = _load_search(db, search)
    console = Console(width=max(120, width + 80), highlight=False)
    console.print(f"[bold]{row.label}[/bold] on {problem.dataset}/{problem.lang}/{problem.index} · {row.status} · "
                  f"answer {row.final_answer} · correct {row.correct} · {row.tokens} tokens · {len(nodes)} nodes")
    console.print(Text(f"Q: {problem.question}"))
    if not nodes:
        console.print("(no nodes stored)" + (f": {row.error}" if row.error else ""))
        return
    for line in tree_lines(nodes, row.chosen_path, width):
        console.print(Text(line.text, style="bold green" if line.chosen else ""), soft_wrap=True)


@traces_app.command("path")
def path(
    node: str = typer.Argument(..., help="Node id (see `marco traces show SEARCH`)."),
    db: str = DbOption,
) -> None:
    """The full reasoning text from the root to NODE."""
    store = open_store(db)
    try:
        nodes = store.path_nodes(node)
    except StoreError as exc:
        fail(str(exc))
    typer.echo("".join(n.text for n in nodes))


@traces_app.command("tree")
def tree(
    search: str = typer.Argument(..., help="Search id."),
    html_file: Path = typer.Option(..., "--html", help="Write the tree to this self-contained HTML file."),
    db: str = DbOption,
) -> None:
    """Draw the search tree as one HTML file: nodes coloured by confidence; click one for its text and
    per-token confidences."""
    from marco.report.html import tree_html

    row, problem, nodes = _load_search(db, search)
    if not nodes:
        fail(f"search {search} has no stored nodes" + (f" ({row.error})" if row.error else ""))
    summary = f"{row.label} · answer {row.final_answer} · correct {row.correct} · {row.tokens} tokens · {len(nodes)} nodes"
    page = tree_html(nodes, row.chosen_path, f"{problem.dataset}/{problem.lang}/{problem.index} — {row.label}",
                     problem.question, summary)
    try:
        html_file.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {html_file}: {exc.strerror}")
    typer.echo(f"wrote {html_file} ({len(nodes)} nodes)")


def _load_search(db: str, search: str):  # type: ignore[no-untyped-def]
    """A stored search's row, its problem and its nodes; a one-line error when it is unknown."""
    store = open_store(db)
    try:
        row = store.get_search(search)
        problem = store.get_problem(str(row.problem_id))
        nodes = store.load_nodes(search)  # an archived batch: says where its trees went
    except StoreError as exc:
        fail(str(exc))
    return row, problem, nodes
