"""The store on Postgres and SQLite: schema, bulk planning, leases, node writes and reads."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event, inspect, select

from marco.search.base import SearchConfig, SearchResult
from marco.search.tree import Node, Tree, make_id
from marco.store import Store, StoreError, StoreSink
from marco.store.models import NodeRow, Search
from marco.tasks.base import Problem, Score


def _problems(n: int, lang: str = "en") -> list[Problem]:
    return [Problem("mgsm", lang, i, f"What is {i} + 1?", (str(i + 1),)) for i in range(n)]


def _tree(search_id: str, n_children: int = 3, conf_len: int = 4) -> Tree:
    tree = Tree(search_id)
    root = tree.add(Node(id=make_id(search_id, "root"), search_id=search_id, parent_id=None, depth=0, kind="root"))
    for i in range(n_children):
        child = tree.new_child(
            root,
            "ministep",
            text=f"step {i} ünïcødé",
            token_ids=[i * 10 + k for k in range(conf_len)],
            confidences=[1.0 / (k + 3 + i) for k in range(conf_len)],
            value=0.1 * (i + 1),
            round=1,
        )
        tree.new_child(child, "answer", text=f"<Output>{i}</Output>", token_ids=[7], confidences=[0.9], terminal=True, answer=str(i), round=2)
    return tree


def _count_statements(store: Store):
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(store.engine, "before_cursor_execute", before)


def test_schema_has_plain_columns_and_indexes(store: Store) -> None:
    insp = inspect(store.engine)
    tables = set(insp.get_table_names())
    assert {"models", "batches", "jobs", "problems", "searches", "nodes"} <= tables
    for table in tables - {"alembic_version"}:
        cols = {c["name"] for c in insp.get_columns(table)}
        assert {"id", "created_at"} <= cols, table
    search_cols = {c["name"] for c in insp.get_columns("searches")}
    assert {"batch_id", "problem_id", "strategy", "final_answer", "correct", "dataset", "lang"} <= search_cols
    node_cols = {c["name"] for c in insp.get_columns("nodes")}
    assert {"search_id", "parent_id", "depth", "kind", "confidences", "token_ids", "mean_confidence", "value",
            "visits", "terminal", "answer", "text"} <= node_cols
    job_cols = {c["name"] for c in insp.get_columns("jobs")}
    assert {"status", "attempts", "lease_until", "worker", "error", "payload", "started_at", "finished_at"} <= job_cols
    indexed = {tuple(ix["column_names"]) for t in ("searches", "nodes") for ix in insp.get_indexes(t)}
    for cols in [("batch_id",), ("dataset", "lang", "strategy"), ("strategy", "correct"), ("search_id", "seq"), ("parent_id",)]:
        assert cols in indexed, cols


def test_plan_10k_problems_in_bulk_quickly(store: Store) -> None:
    problems = _problems(10_000)
    seen, stop = _count_statements(store)
    t0 = time.perf_counter()
    plan = store.create_batch(problems, [SearchConfig(strategy="greedy")], model="scripted", chunk_size=8)
    elapsed = time.perf_counter() - t0
    stop()
    assert elapsed < 10, elapsed
    assert len(plan.job_ids) == 1250 and len(plan.search_ids) == 10_000
    inserts = [s for s in seen if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) < 40, len(inserts)  # bulk statements, not one per row
    progress = store.batch_progress(plan.batch_id)
    assert progress.n_problems == 10_000 and progress.jobs == {"queued": 1250}
    assert progress.searches == {"pending": 10_000}
    # the job knows its problems, in order, with their references
    pairs = store.job_problems(plan.job_ids[1])
    assert [p.index for _, p in pairs] == list(range(8, 16))
    assert pairs[0][1].references == ("9",)


def test_malformed_problem_keeps_its_error(store: Store) -> None:
    bad = Problem("mgsm", "en", 5, "", (), error="row 5: answer is not a number")
    plan = store.create_batch([*_problems(2), bad], [SearchConfig(strategy="greedy")])
    problems = [p for _, p in store.job_problems(plan.job_ids[0])]
    assert problems[-1].error == "row 5: answer is not a number"


def test_claim_is_exclusive_and_expired_leases_are_reclaimed(store: Store) -> None:
    plan = store.create_batch(_problems(4), [SearchConfig(strategy="greedy")], chunk_size=2)
    job = plan.job_ids[0]
    first = store.claim_job(job, "w1", lease_s=60)
    assert first is not None and first.attempts == 1 and first.payload["problem_ids"]
    assert store.claim_job(job, "w2", lease_s=60) is None
    assert store.renew_lease(job, "w1", 60) and not store.renew_lease(job, "w2", 60)
    assert store.expired_jobs(plan.batch_id) == []
    assert store.get_batch(plan.batch_id).status == "running"
    # w1 dies: its lease runs out, w2 takes over and w1 can no longer renew or finish
    store.renew_lease(job, "w1", lease_s=-1)
    assert [j.id for j in store.expired_jobs(plan.batch_id)] == [job]
    second = store.claim_job(job, "w2", lease_s=60)
    assert second is not None and second.attempts == 2 and second.worker == "w2"
    assert not store.renew_lease(job, "w1", 60)
    assert not store.finish_job(job, worker="w1")
    assert store.finish_job(job, worker="w2")
    assert store.claim_job(job, "w3") is None  # done jobs are never claimed again
    assert store.get_batch(plan.batch_id).status == "running"  # the other job is still queued
    store.claim_job(plan.job_ids[1], "w2")
    assert store.fail_job(plan.job_ids[1], "model crashed")
    progress = store.batch_progress(plan.batch_id)
    assert progress.jobs == {"done": 1, "failed": 1} and progress.finished
    assert store.get_batch(plan.batch_id).status == "failed"
    assert store.get_job(plan.job_ids[1]).error == "model crashed"
    assert store.requeue_failed(plan.batch_id) == [plan.job_ids[1]]
    assert store.get_batch(plan.batch_id).status == "running"
    again = store.claim_job(plan.job_ids[1], "w4")
    assert again is not None and again.attempts == 2


def test_cancel_batch(store: Store) -> None:
    plan = store.create_batch(_problems(6), [SearchConfig(strategy="greedy")], chunk_size=2)
    store.claim_job(plan.job_ids[0], "w1")
    store.finish_job(plan.job_ids[0])
    assert store.cancel_batch(plan.batch_id) == 2
    progress = store.batch_progress(plan.batch_id)
    assert progress.status == "cancelled" and progress.jobs == {"done": 1, "cancelled": 2}
    assert store.claim_job(plan.job_ids[1], "w1") is None


def test_unknown_ids_are_one_line_errors(store: Store) -> None:
    for call in (lambda: store.batch_progress("nope"), lambda: store.get_search(make_id("x")),
                 lambda: store.path_nodes(make_id("y")), lambda: store.cancel_batch(make_id("z"))):
        with pytest.raises(StoreError) as info:
            call()
        assert "\n" not in str(info.value)


def test_unreachable_database_is_a_one_line_error() -> None:
    with pytest.raises(StoreError) as info:
        Store.open("postgresql://postgres@127.0.0.1:1/nothing")
    assert "does not answer" in str(info.value) and "\n" not in str(info.value)


def test_nodes_round_trip_exactly_and_rewrites_never_duplicate(store: Store) -> None:
    plan = store.create_batch(_problems(1), [SearchConfig(strategy="mcts")])
    sid = plan.search_ids[0]
    tree = _tree(sid)
    nodes = list(tree)
    sink = StoreSink(store)
    seen, stop = _count_statements(store)
    sink.on_round(0, nodes, [])
    stop()
    assert sum(1 for s in seen if s.lstrip().upper().startswith("INSERT")) == 1  # one bulk insert per round
    sink.on_round(0, nodes, [])  # a retried round
    assert store.count_nodes(sid) == len(nodes)

    root = tree.root
    root.visits, root.value_sum = 3, 0.123456789012345
    child = root.children[1]
    child.visits, child.value_sum = 2, 1 / 3
    seen, stop = _count_statements(store)
    sink.on_round(1, [], [root, child])
    stop()
    assert sum(1 for s in seen if s.lstrip().upper().startswith("UPDATE")) == 1
    loaded = store.load_nodes(sid)
    assert [n.id for n in loaded] == [n.id for n in nodes]
    for got, want in zip(loaded, nodes):
        for f in ("parent_id", "depth", "kind", "text", "token_ids", "confidences", "value", "value_sum", "visits",
                  "terminal", "answer", "round", "index", "seq", "finish_reason"):
            assert getattr(got, f) == getattr(want, f), f
    with store.sessions() as s:
        row = s.execute(select(NodeRow).where(NodeRow.id == child.id)).scalar_one()
        assert row.mean_confidence == pytest.approx(sum(child.confidences) / len(child.confidences))
        assert row.num_tokens == len(child.token_ids)
    path = store.path_nodes(child.children[0].id)
    assert [n.kind for n in path] == ["root", "ministep", "answer"]
    assert sink.write_s > 0 and sink.nodes_written == 2 * len(nodes)


def test_results_are_written_once_searches_end(store: Store) -> None:
    problems = _problems(2)
    config = SearchConfig(strategy="greedy")
    plan = store.create_batch(problems, [config])
    results = [
        SearchResult(plan.search_ids[0], problems[0], config, Tree(plan.search_ids[0]), answer="1",
                     score=Score(True, 1.0), tokens=50, rounds=3, elapsed_s=0.5, confidence=0.8),
        SearchResult(plan.search_ids[1], problems[1], config, Tree(plan.search_ids[1]), answer=None,
                     score=Score(False, 0.0), tokens=70, error=None),
    ]
    StoreSink(store).on_finish(results)
    progress = store.batch_progress(plan.batch_id)
    assert progress.searches == {"done": 2}
    assert (progress.solved, progress.correct, progress.scored, progress.tokens) == (1, 1, 2, 120)
    assert progress.accuracy == 0.5
    with store.sessions() as s:
        row = s.get(Search, plan.search_ids[0])
        assert (row.final_answer, row.correct, row.tokens, row.strategy, row.label) == ("1", True, 50, "greedy", config.label)


def test_two_workers_ending_the_last_two_jobs_at_once_close_the_batch(pg_url: str) -> None:
    """Each job's end commits before the batch is counted, so the later count sees both ends."""
    import threading

    store = Store.open(pg_url)
    batches = []
    for k in range(12):
        problems = [Problem("demo", "en", i, f"race {k} {i}", ("0",)) for i in range(2)]
        plan = store.create_batch(problems, [SearchConfig(strategy="greedy")], model="scripted", chunk_size=1)
        for n, job in enumerate(plan.job_ids):
            assert store.claim_job(job, f"w{n}", 60) is not None
        batches.append(plan)
    for plan in batches:
        barrier = threading.Barrier(2)

        def end(job: str, worker: str) -> None:
            barrier.wait()
            store.finish_job(job, worker=worker)

        threads = [threading.Thread(target=end, args=(job, f"w{n}")) for n, job in enumerate(plan.job_ids)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [store.get_batch(p.batch_id).status for p in batches] == ["done"] * len(batches)
