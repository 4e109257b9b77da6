"""``marco archive``: move ended batches' tree nodes out of the database into verified files, and back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from marco.cli import app
from marco.cli.db import DbOption, fail, open_store


@app.command(
    "archive",
    epilog=(
        "\b\nExamples:\n"
        "  marco archive --older-than 30d --dir /mnt/archive   every reason batch that ended over 30 days ago\n"
        "  marco archive --older-than 7d --dry-run             list them, change nothing\n"
        "  marco archive mgsm-en --dir /mnt/archive            one batch, by name or id\n"
        "  marco archive --restore BATCH                       put its nodes back (file kept)\n"
        "  marco archive --list                                every archived batch, where its file is"
    ),
)
def archive_cmd(
    batches: Optional[list[str]] = typer.Argument(None, help="Batch ids or names to archive (or use --older-than)."),
    older_than: Optional[str] = typer.Option(
        None, "--older-than",
        help="Archive every ended reason batch that ended more than this long ago: 30d, 12h, 90m, 2w.",
    ),  # fmt: skip
    directory: Optional[Path] = typer.Option(
        None, "--dir", envvar="MARCO_ARCHIVE_DIR", show_envvar=True,
        help="Where the files go (default ./archive): DIR/<batch id>.nodes.jsonl.gz. Use storage every "
             "machine that may restore can reach; the absolute path is recorded in the batch.",
    ),  # fmt: skip
    restore: Optional[str] = typer.Option(
        None, "--restore", metavar="BATCH",
        help="Put an archived batch's nodes back from its file (checked against the SHA-256 recorded when it "
             "was archived). The file is kept.",
    ),  # fmt: skip
    file: Optional[Path] = typer.Option(None, "--file", help="With --restore: the archive file, if it moved."),
    list_: bool = typer.Option(False, "--list", help="List archived batches (when, where, rows) and exit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be archived; change nothing."),
    chunk: int = typer.Option(5000, "--chunk", help="Rows read, written, deleted or restored per transaction."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per batch."),
    db: str = DbOption,
) -> None:
    """Archive the tree nodes of ended batches to compressed files, or restore them.

    The nodes table is the one that grows without bound (about 1 KB per node; docs/operations.md,
    "Capacity"). For each batch (done, failed or cancelled, with no queued or running job) this writes
    every node, every column (token ids, per-token confidences, visits, values, claim), to
    DIR/<batch id>.nodes.jsonl.gz (gzip; a header line, then one JSON object per node); reads the file back
    and checks its row count and content digest; records archived_at, the path, the row count and the
    file's SHA-256 in the batch; and only then deletes the batch's nodes, in chunks of --chunk rows, each
    in its own short transaction. Batches, problems, searches (answers, scores, tokens, chosen paths) stay in
    the database: reports and `marco traces list` work as before; reading an archived tree (traces show/tree/path,
    the explorer, synthesis, export) stops with a message naming the file and this command's --restore.

    A crash before the batch is marked loses nothing (every node is still in the table: run it again); a
    crash while deleting leaves the batch marked with some nodes left (run it again to finish, or restore).
    """
    from marco.store import StoreError
    from marco.store.archive import default_archive_dir, parse_age

    if chunk <= 0:
        fail("--chunk must be a positive number of rows")
    modes = sum([bool(restore), bool(list_), bool(batches) or older_than is not None])
    if modes != 1:
        fail("give batches to archive, --older-than AGE, --restore BATCH or --list (one of them)")
    if file is not None and not restore:
        fail("--file goes with --restore")
    store = open_store(db)

    def emit(doc: dict[str, Any], line: str) -> None:
        typer.echo(json.dumps(doc, default=str) if as_json else line)

    if list_:
        for b in store.archived_batches():
            emit({"batch_id": str(b.id), "name": b.name, "archived_at": b.archived_at, "path": b.archive_path,
                  "rows": b.archive_rows, "sha256": b.archive_sha256},
                 f"{b.id}  {b.name:<24} {b.archived_at:%Y-%m-%d %H:%M}  {b.archive_rows:>10} nodes  {b.archive_path}")  # fmt: skip
        return

    if restore:
        try:
            r = store.restore_batch(restore, chunk=chunk, path=file)
        except (StoreError, OSError, ValueError) as exc:
            fail(str(exc).splitlines()[0])
        emit({"restored": r.to_dict()}, f"restored {r.rows} nodes of batch {r.batch_id} from {r.path} (file kept)")
        return

    try:
        if older_than is not None:
            try:
                age = parse_age(older_than)
            except ValueError as exc:
                fail(str(exc))
            targets = [str(b.id) for b in store.archivable_batches(age)]
            targets += [store.resolve_batch(b) for b in batches or [] if store.resolve_batch(b) not in targets]
        else:
            targets = [store.resolve_batch(b) for b in batches or []]
    except StoreError as exc:
        fail(str(exc))
    out_dir = directory or default_archive_dir()
    if dry_run:
        for batch_id in targets:
            b = store.get_batch(batch_id)
            n = store.count_batch_nodes(batch_id)
            emit({"would_archive": batch_id, "name": b.name, "status": b.status, "nodes": n},
                 f"would archive {batch_id}  {b.name:<24} {b.status:<9} {n:>10} nodes -> {out_dir}")  # fmt: skip
        if not targets:
            emit({"would_archive": None}, "nothing to archive")
        return
    failures = 0
    for batch_id in targets:
        try:
            r = store.archive_batch(batch_id, out_dir, chunk=chunk)
        except (StoreError, OSError) as exc:
            failures += 1
            typer.echo(f"error: {str(exc).splitlines()[0]}", err=True)
            continue
        emit({"archived": r.to_dict()},
             f"archived {r.rows} nodes of batch {r.batch_id} -> {r.path} ({r.bytes:,} bytes, sha256 {r.sha256[:12]}…); "
             f"{r.deleted} deleted from the table")  # fmt: skip
    if not targets:
        emit({"archived": None}, "nothing to archive")
    if failures:
        raise typer.Exit(1)
