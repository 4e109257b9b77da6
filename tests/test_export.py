"""``marco export BATCH --parquet DIR``: a real stored batch, read back with pyarrow, equals the store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from marco.cli import app
from marco.store import Store, StoreError
from marco.store.export import SCHEMAS, export_parquet, iter_batches
from marco.store.models import NodeRow, ProblemRow, Search

runner = CliRunner()


def _run_batch(db_url: str) -> str:
    """An MCTS run of the scripted backend over 3 English and 3 Chinese MGSM problems (the packaged data)."""
    out = runner.invoke(app, ["run", "--dataset", "mgsm", "--lang", "en,zh", "--limit", "3", "--model", "scripted",
                              "--strategy", "mcts", "--action", "ministep:8", "--budget", "160", "--chunk", "2",
                              "--db", db_url])  # fmt: skip
    assert out.exit_code == 0, out.output
    return re.search(r"batch ([0-9a-f-]{36})", out.output).group(1)  # type: ignore[union-attr]


def test_export_cli_round_trips_a_stored_batch(db_url: str, store: Store, tmp_path: Path) -> None:
    batch_id = _run_batch(db_url)
    _run_batch(db_url)  # a second batch in the same store must not leak into the export
    out = runner.invoke(app, ["export", batch_id, "--parquet", str(tmp_path / "out"), "--chunk", "7", "--json",
                              "--db", db_url])  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])

    with store.sessions() as s:
        problems = {str(r.id): r for r in s.scalars(select(ProblemRow).where(ProblemRow.batch_id == batch_id))}
        searches = {str(r.id): r for r in s.scalars(select(Search).where(Search.batch_id == batch_id))}
        nodes = {str(r.id): r for r in s.scalars(select(NodeRow).where(NodeRow.search_id.in_(list(searches))))}
    assert len(problems) == 6 and len(searches) == 6 and len(nodes) > 12
    assert summary["rows"] == {"problems": 6, "searches": 6, "nodes": len(nodes)}

    tables = {t: pq.read_table(tmp_path / "out" / f"{t}.parquet") for t in ("problems", "searches", "nodes")}
    for name, table in tables.items():
        assert table.schema.equals(SCHEMAS[name]), name
    assert tables["nodes"].schema.field("confidences").type == pa.list_(pa.float64())
    assert tables["nodes"].schema.field("token_ids").type == pa.list_(pa.int32())
    # written in chunks of 7 rows: one row group per chunk
    assert pq.ParquetFile(tmp_path / "out" / "nodes.parquet").num_row_groups == -(-len(nodes) // 7)

    for row in tables["nodes"].to_pylist():
        stored = nodes[row["id"]]
        assert row["confidences"] == list(stored.confidences)  # exactly: doubles, not float32
        assert row["token_ids"] == list(stored.token_ids)
        assert (row["search_id"], row["parent_id"], row["seq"], row["kind"], row["text"]) == (
            str(stored.search_id), None if stored.parent_id is None else str(stored.parent_id), stored.seq,
            stored.kind, stored.text,
        )  # fmt: skip
        assert (row["visits"], row["value"], row["value_sum"], row["answer"]) == (
            stored.visits, stored.value, stored.value_sum, stored.answer)
    # each tree in creation order
    order = [(r["search_id"], r["seq"]) for r in tables["nodes"].to_pylist()]
    assert order == sorted(order)

    for row in tables["searches"].to_pylist():
        stored = searches[row["id"]]
        assert (row["problem_id"], row["label"], row["final_answer"], row["correct"], row["tokens"]) == (
            str(stored.problem_id), stored.label, stored.final_answer, stored.correct, stored.tokens)
        assert row["chosen_path"] == [str(x) for x in stored.chosen_path]
        assert json.loads(row["config"]) == stored.config
        assert set(row["chosen_path"]) <= set(nodes)
    for row in tables["problems"].to_pylist():
        stored = problems[row["id"]]
        assert (row["lang"], row["index"], row["question"], row["reference"]) == (
            stored.lang, stored.index, stored.question, list(stored.reference))
    # the joins an analyst writes work: nodes -> searches -> problems
    assert {r["search_id"] for r in tables["nodes"].to_pylist()} == set(searches)
    assert {r["problem_id"] for r in tables["searches"].to_pylist()} == set(problems)


def test_export_streams_in_chunks_and_refuses_to_overwrite(db_url: str, store: Store, tmp_path: Path) -> None:
    batch_id = _run_batch(db_url)
    sizes = [b.num_rows for b in iter_batches(store, "nodes", batch_id, chunk=5)]
    assert sizes and max(sizes) <= 5 and sum(sizes) == store.count_nodes() - _other_nodes(store, batch_id)
    first = export_parquet(store, batch_id, tmp_path / "x")
    with pytest.raises(FileExistsError):
        export_parquet(store, batch_id, tmp_path / "x")
    again = export_parquet(store, batch_id, tmp_path / "x", overwrite=True, tables=("searches",))
    assert again.rows == {"searches": first.rows["searches"]}
    assert not list((tmp_path / "x").glob("*.partial"))
    out = runner.invoke(app, ["export", batch_id, "--parquet", str(tmp_path / "x"), "--db", db_url])
    assert out.exit_code == 1 and "exists" in out.output and "--overwrite" in out.output


def _other_nodes(store: Store, batch_id: str) -> int:
    from sqlalchemy import func

    with store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(NodeRow).join(Search, Search.id == NodeRow.search_id)
                            .where(Search.batch_id != batch_id)) or 0)  # fmt: skip


def test_export_unknown_batch_is_a_one_line_error(db_url: str, store: Store, tmp_path: Path) -> None:
    out = runner.invoke(app, ["export", "no-such-batch", "--parquet", str(tmp_path / "o"), "--db", db_url])
    assert out.exit_code == 1
    assert out.output.strip() == "error: no batch 'no-such-batch': list batches with `marco traces list` or `marco status`"
    assert not (tmp_path / "o").exists()
    with pytest.raises(StoreError):
        export_parquet(store, "00000000-0000-0000-0000-000000000000", tmp_path / "o")
