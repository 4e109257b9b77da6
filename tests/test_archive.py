"""`marco archive` (issue 18): an ended batch's nodes to a verified gzip file and back, on Postgres and SQLite.

Archive → the batch's nodes are gone from the table and the file holds every row; restore → the same rows,
every column compared. A batch that has not ended is refused; a crash after the file is written (before the
batch is marked) or in the middle of the chunked delete loses nothing; every reader of an archived tree
(traces, the explorer, synthesis, export, a retry) says where the file is and how to restore it.
"""

from __future__ import annotations

import gzip
import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from marco.cli import app
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store, StoreError
from marco.store.archive import BatchArchived, archive_file
from marco.store.models import Batch, NodeRow, Search
from marco.tasks.base import Problem

runner = CliRunner()
MCTS = SearchConfig(strategy="mcts", action="ministep:6", budget=300, children=2, seed=1, reflect=True)
GREEDY = SearchConfig(strategy="greedy", budget=200)
NODES = NodeRow.__table__


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of its own (``--older-than`` selects across the whole store)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'marco.db'}"
    return request.getfixturevalue("pg_database")()


@pytest.fixture()
def store(url: str) -> Iterator[Store]:
    s = Store.open(url)
    yield s
    s.close()


def run_batch(store: Store, name: str, n: int = 4) -> Any:
    problems = [Problem("mgsm", "en", i, f"What is 40 + {i}? ({name})", ("42",)) for i in range(n)]
    plan = store.create_batch(problems, [MCTS, GREEDY], model="scripted", task="mgsm", chunk_size=2, name=name)
    for job in plan.job_ids:
        assert execute_job(store, job, BackendCache(), "w").status == "done"
    return plan


def node_rows(store: Store, batch_id: str) -> list[tuple[Any, ...]]:
    """Every column of every node of the batch, ordered by id."""
    with store.sessions() as s:
        rows = s.execute(
            select(NODES).join(Search, Search.id == NODES.c.search_id).where(Search.batch_id == batch_id).order_by(NODES.c.id)
        ).all()
    return [tuple(r) for r in rows]


def test_archive_then_restore_gives_back_every_column(store: Store, tmp_path: Path) -> None:
    plan = run_batch(store, "arch-a")
    other = run_batch(store, "arch-b", n=2)
    before, other_before = node_rows(store, plan.batch_id), node_rows(store, other.batch_id)
    assert len(before) > 20 and any(r[NODES.c.keys().index("confidences")] for r in before)

    result = store.archive_batch(plan.batch_id, tmp_path / "arch", chunk=7)  # several delete chunks
    path = archive_file(tmp_path / "arch", plan.batch_id).resolve()
    assert result.path == str(path) and result.rows == len(before) == result.deleted
    assert node_rows(store, plan.batch_id) == [] and store.count_batch_nodes(plan.batch_id) == 0
    assert node_rows(store, other.batch_id) == other_before  # another batch untouched
    # the file: a header, then one JSON object per node with every column
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        header, *docs = [json.loads(line) for line in fh]
    assert header["batch_id"] == plan.batch_id and header["rows"] == len(before) == len(docs)
    assert set(docs[0]) == set(NODES.c.keys()) and {d["id"] for d in docs} == {str(r[NODES.c.keys().index("id")]) for r in before}
    batch = store.get_batch(plan.batch_id)
    assert batch.archived_at is not None and batch.archive_path == str(path) and batch.archive_rows == len(before)
    assert len(batch.archive_sha256) == 64
    # searches (answers, scores) stay: reports work; trees say where they went
    assert store.batch_progress(plan.batch_id).solved == 8
    with pytest.raises(BatchArchived, match=rf"batch {plan.batch_id} was archived to {path} on .*marco archive --restore {plan.batch_id}"):
        store.load_nodes(plan.search_ids[0])
    with pytest.raises(StoreError, match="archived"):
        store.archive_batch(plan.batch_id, tmp_path / "arch")  # once is enough

    restored = store.restore_batch(plan.batch_id, chunk=9)
    assert restored.rows == len(before)
    assert node_rows(store, plan.batch_id) == before  # every column, confidences and timestamps included
    batch = store.get_batch(plan.batch_id)
    assert (batch.archived_at, batch.archive_path, batch.archive_rows, batch.archive_sha256) == (None, None, None, None)
    assert path.exists()  # the file is kept
    assert len(store.load_nodes(plan.search_ids[0])) > 0
    # archived again after a restore: byte-identical file (no time in the gzip header)
    sha = result.sha256
    assert store.archive_batch(plan.batch_id, tmp_path / "arch").sha256 == sha


def test_a_batch_that_has_not_ended_is_refused(store: Store, url: str, tmp_path: Path) -> None:
    problems = [Problem("mgsm", "en", i, f"q{i}", ("42",)) for i in range(4)]
    plan = store.create_batch(problems, [MCTS], model="scripted", task="mgsm", chunk_size=2)
    assert execute_job(store, plan.job_ids[0], BackendCache(), "w").status == "done"  # half of it ran
    before = node_rows(store, plan.batch_id)
    assert store.get_batch(plan.batch_id).status == "running"
    with pytest.raises(StoreError, match="only ended batches"):
        store.archive_batch(plan.batch_id, tmp_path)
    assert node_rows(store, plan.batch_id) == before and not list(tmp_path.glob("*.gz"))
    out = runner.invoke(app, ["archive", plan.batch_id, "--dir", str(tmp_path), "--db", url])
    assert out.exit_code == 1 and "only ended batches" in out.output
    assert store.archivable_batches(timedelta(0)) == []  # --older-than never picks it either


def test_a_crash_between_writing_and_deleting_loses_nothing(store: Store, tmp_path: Path, monkeypatch) -> None:
    plan = run_batch(store, "arch-crash")
    before = node_rows(store, plan.batch_id)

    def crash(*_: Any, **__: Any) -> None:
        raise RuntimeError("power cut after the file was written")

    monkeypatch.setattr(Store, "_mark_archived", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        store.archive_batch(plan.batch_id, tmp_path)
    monkeypatch.undo()
    assert archive_file(tmp_path, plan.batch_id).exists()  # the file was written and verified ...
    assert node_rows(store, plan.batch_id) == before  # ... and not a node was deleted
    assert store.get_batch(plan.batch_id).archived_at is None
    assert len(store.load_nodes(plan.search_ids[0])) > 0  # readers see the tree as before
    # run again: it rewrites the file and completes
    assert store.archive_batch(plan.batch_id, tmp_path).deleted == len(before)

    # a crash in the middle of the chunked delete: the batch is marked, some nodes are left
    store.restore_batch(plan.batch_id)
    calls = []

    def crash_after_first_chunk(n: int) -> None:
        calls.append(n)
        raise RuntimeError("killed while deleting")

    with pytest.raises(RuntimeError, match="killed"):
        store.archive_batch(plan.batch_id, tmp_path, chunk=5, on_deleted=crash_after_first_chunk)
    left = store.count_batch_nodes(plan.batch_id)
    assert calls == [5] and left == len(before) - 5
    with pytest.raises(BatchArchived):  # never a partial tree
        store.load_nodes_many(plan.search_ids)
    finished = store.archive_batch(plan.batch_id, tmp_path, chunk=5)  # run again: finishes the delete
    assert finished.deleted == left and store.count_batch_nodes(plan.batch_id) == 0
    store.restore_batch(plan.batch_id)
    assert node_rows(store, plan.batch_id) == before


def test_a_changed_or_missing_file_is_not_restored(store: Store, tmp_path: Path) -> None:
    plan = run_batch(store, "arch-file", n=2)
    result = store.archive_batch(plan.batch_id, tmp_path)
    path = Path(result.path)
    data = path.read_bytes()
    path.write_bytes(data[:-20] + bytes(20))
    with pytest.raises(StoreError, match="does not match the SHA-256"):
        store.restore_batch(plan.batch_id)
    moved = tmp_path / "moved.jsonl.gz"
    moved.write_bytes(data)
    path.unlink()
    with pytest.raises(StoreError, match="missing"):
        store.restore_batch(plan.batch_id)
    assert store.restore_batch(plan.batch_id, path=moved).rows == result.rows


def test_readers_of_an_archived_batch_say_where_it_went(store: Store, url: str, tmp_path: Path) -> None:
    from marco.synthesis import SynthesisConfig, plan_synthesis, synthesize
    from marco.ui.queries import Explorer

    plan = run_batch(store, "arch-read", n=2)
    mcts = store.find_searches(plan.batch_id, strategy="mcts", limit=1)[0]
    leaf = mcts.chosen_path[-1]
    path = store.archive_batch(plan.batch_id, tmp_path).path
    expect = f"batch {plan.batch_id} was archived to {path} on "
    restore = f"marco archive --restore {plan.batch_id}"

    for args in (["traces", "show", str(mcts.id)], ["traces", "tree", str(mcts.id), "--html", str(tmp_path / "t.html")],
                 ["export", plan.batch_id, "--parquet", str(tmp_path / "pq")]):
        out = runner.invoke(app, [*args, "--db", url])
        assert out.exit_code == 1 and expect in out.output and restore in out.output, (args, out.output)
    out = runner.invoke(app, ["traces", "path", leaf, "--db", url])
    assert out.exit_code == 1 and "archived" in out.output and plan.batch_id in out.output, out.output
    # the trace explorer's search page
    with pytest.raises(BatchArchived, match=restore):
        Explorer(store.engine).search(str(mcts.id))
    # synthesis from the batch: directly, and as a job
    with pytest.raises(BatchArchived, match=restore):
        synthesize(store, SynthesisConfig(batches=[plan.batch_id]), "run")
    _, job = plan_synthesis(store, SynthesisConfig(batches=[plan.batch_id]))
    outcome = execute_job(store, job, BackendCache(), worker="t")
    assert outcome.status == "failed" and expect in (outcome.error or ""), outcome.error
    # a retry of the batch would resume from no nodes
    with store.sessions.begin() as s:
        s.execute(Search.__table__.update().where(Search.batch_id == plan.batch_id).values(status="failed"))
    with pytest.raises(BatchArchived):
        store.requeue_failed(plan.batch_id)
    # reports read searches only: still fine
    assert runner.invoke(app, ["report", plan.batch_id, "--db", url]).exit_code == 0


def test_cli_older_than_dry_run_list_and_restore(store: Store, url: str, tmp_path: Path) -> None:
    plan = run_batch(store, "arch-cli", n=2)
    n = store.count_batch_nodes(plan.batch_id)
    cli = lambda *a: runner.invoke(app, [*a, "--db", url])  # noqa: E731
    out = cli("archive", "--older-than", "1h", "--dir", str(tmp_path))
    assert out.exit_code == 0 and "nothing to archive" in out.output  # it ended just now
    out = cli("archive", "--older-than", "0s", "--dry-run", "--dir", str(tmp_path))
    assert out.exit_code == 0 and f"would archive {plan.batch_id}" in out.output and store.count_batch_nodes(plan.batch_id) == n
    out = cli("archive", "--older-than", "0s", "--dir", str(tmp_path), "--json")
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output.strip().splitlines()[-1])["archived"]
    assert doc["batch_id"] == plan.batch_id and doc["rows"] == n == doc["deleted"]
    out = cli("archive", "--list")
    assert out.exit_code == 0 and plan.batch_id in out.output and doc["path"] in out.output
    out = cli("archive", "--older-than", "0s", "--dir", str(tmp_path))
    assert "nothing to archive" in out.output  # archived batches are not chosen again
    out = cli("archive", "--restore", plan.batch_id)
    assert out.exit_code == 0 and f"restored {n} nodes" in out.output
    assert store.count_batch_nodes(plan.batch_id) == n
    assert cli("archive").exit_code == 1  # nothing asked
    assert cli("archive", "--older-than", "soon").exit_code == 1


def test_archived_columns_are_in_the_migration(store: Store) -> None:
    from marco.store import migrate

    assert migrate.diff(store.engine) == []
    with store.sessions() as s:
        assert s.scalar(select(Batch.archived_at).limit(1)) is None
