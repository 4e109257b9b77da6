"""A batch's problems, searches and tree nodes as Parquet files, streamed in chunks (constant memory).

Rows are read with a server-side cursor on Postgres (``stream_results`` + ``yield_per``; SQLite's cursor is
incremental anyway) and written one row group per chunk with :class:`pyarrow.parquet.ParquetWriter`, so a
batch with millions of nodes never sits in memory at once. Per-token confidences stay ``list<double>`` (the
store keeps them as double precision; float32 would change the values) and token ids ``list<int32>``;
free-form JSON documents (configs, metadata) are JSON strings. Read the files with pandas, DuckDB, polars or
``datasets.load_dataset("parquet", ...)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Select, func, select

from marco.store.models import NodeRow, ProblemRow, Search
from marco.store.store import Store

DEFAULT_CHUNK = 5_000
TABLES = ("problems", "searches", "nodes")

_TS = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "problems": pa.schema([
        ("id", pa.string()), ("batch_id", pa.string()), ("dataset", pa.string()), ("lang", pa.string()),
        ("index", pa.int32()), ("question", pa.large_string()), ("reference", pa.list_(pa.string())),
        ("error", pa.string()), ("meta", pa.string()), ("created_at", _TS),
    ]),
    "searches": pa.schema([
        ("id", pa.string()), ("batch_id", pa.string()), ("job_id", pa.string()), ("problem_id", pa.string()),
        ("model_id", pa.string()), ("dataset", pa.string()), ("lang", pa.string()), ("strategy", pa.string()),
        ("action", pa.string()), ("label", pa.string()), ("config", pa.string()), ("status", pa.string()),
        ("final_answer", pa.string()), ("final_node_id", pa.string()), ("correct", pa.bool_()),
        ("score", pa.float64()), ("confidence", pa.float64()), ("tokens", pa.int64()), ("rounds", pa.int32()),
        ("elapsed_s", pa.float64()), ("chosen_path", pa.list_(pa.string())), ("error", pa.string()),
        ("tree_depth", pa.int32()), ("path_depth", pa.int32()), ("created_at", _TS), ("finished_at", _TS),
    ]),
    "nodes": pa.schema([
        ("id", pa.string()), ("search_id", pa.string()), ("parent_id", pa.string()), ("seq", pa.int32()),
        ("round", pa.int32()), ("sibling_index", pa.int32()), ("depth", pa.int32()), ("kind", pa.string()),
        ("text", pa.large_string()), ("token_ids", pa.list_(pa.int32())), ("confidences", pa.list_(pa.float64())),
        ("num_tokens", pa.int32()), ("mean_confidence", pa.float64()), ("value", pa.float64()),
        ("value_sum", pa.float64()), ("visits", pa.int32()), ("terminal", pa.bool_()), ("answer", pa.string()),
        ("finish_reason", pa.string()), ("created_at", _TS),
    ]),
}  # fmt: skip

_JSON_TEXT = {"problems": ("meta",), "searches": ("config",), "nodes": ()}
_ID_COLUMNS = {"id", "batch_id", "job_id", "problem_id", "model_id", "final_node_id", "search_id", "parent_id"}


@dataclass
class ExportResult:
    """What was written: rows per table and the files."""

    batch_id: str
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _statement(table: str, batch_id: str) -> Select[Any]:
    if table == "problems":
        cols = [ProblemRow.__table__.c[name] for name in SCHEMAS[table].names]
        return select(*cols).where(ProblemRow.batch_id == batch_id).order_by(ProblemRow.id)
    if table == "searches":
        cols = [Search.__table__.c[name] for name in SCHEMAS[table].names]
        return select(*cols).where(Search.batch_id == batch_id).order_by(Search.id)
    cols = [NodeRow.__table__.c[name] for name in SCHEMAS[table].names]
    # Nodes of the batch's searches, each tree in creation order (the (search_id, seq) index serves this).
    return (
        select(*cols).join(Search, Search.id == NodeRow.search_id).where(Search.batch_id == batch_id)
        .order_by(NodeRow.search_id, NodeRow.seq)
    )  # fmt: skip


def count_rows(store: Store, batch_id: str) -> dict[str, int]:
    """Rows each table will export (for progress bars)."""
    counts = {}
    with store.engine.connect() as conn:
        for table in TABLES:
            stmt = _statement(table, batch_id).order_by(None)
            counts[table] = int(conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one())
    return counts


def _convert(table: str, rows: Sequence[Any]) -> pa.RecordBatch:
    schema = SCHEMAS[table]
    json_text = _JSON_TEXT[table]
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        for name, value in zip(schema.names, row):
            if value is not None:
                if name in _ID_COLUMNS:
                    value = str(value)
                elif name in json_text:
                    value = json.dumps(value, ensure_ascii=False, sort_keys=True)
                elif name == "chosen_path":
                    value = [str(v) for v in value]
            columns[name].append(value)
    return pa.RecordBatch.from_pydict(columns, schema=schema)


def iter_batches(store: Store, table: str, batch_id: str, chunk: int = DEFAULT_CHUNK) -> Iterator[pa.RecordBatch]:
    """``table`` rows of ``batch_id`` as Arrow record batches of at most ``chunk`` rows, streamed."""
    with store.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(_statement(table, batch_id))
        for part in result.partitions(chunk):
            yield _convert(table, part)


def export_parquet(
    store: Store,
    batch: str,
    out_dir: str | os.PathLike[str],
    chunk: int = DEFAULT_CHUNK,
    tables: Sequence[str] = TABLES,
    on_rows: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``OUT/<table>.parquet`` for ``tables`` of ``batch`` (an id or a batch name).

    Raises :class:`~marco.store.StoreError` for an unknown batch and :class:`FileExistsError` when a target
    file exists and ``overwrite`` is False. Each file is written under a temporary name and renamed when
    complete, so an interrupted export never leaves a truncated ``.parquet``. ``on_rows(table, n)`` is called
    after every chunk.
    """
    if chunk <= 0:
        raise ValueError("chunk must be a positive number of rows")
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table {unknown[0]!r}; choose from {', '.join(TABLES)}")
    batch_id = store.resolve_batch(batch)
    if "nodes" in tables:
        store.check_batch_not_archived(batch_id)  # never an empty nodes.parquet for an archived batch
    out = Path(out_dir)
    targets = {t: out / f"{t}.parquet" for t in tables}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; choose another directory or overwrite")
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(batch_id)
    for table, target in targets.items():
        partial = target.with_name(target.name + ".partial")
        written = 0
        try:
            with pq.ParquetWriter(partial, SCHEMAS[table], compression="zstd") as writer:
                for record_batch in iter_batches(store, table, batch_id, chunk):
                    writer.write_batch(record_batch)
                    written += record_batch.num_rows
                    if on_rows is not None:
                        on_rows(table, record_batch.num_rows)
            os.replace(partial, target)
        finally:
            if partial.exists():
                partial.unlink()
        result.rows[table] = written
        result.files[table] = str(target)
    return result
