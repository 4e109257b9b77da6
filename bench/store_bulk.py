"""Write 100,000 realistic nodes into Postgres through the project's writer, and the same rows through
psycopg's COPY (the practical limit), in one run.

Each node has 200 characters of text, 32 token ids and 32 confidences. The writer path is exactly what a
search uses: ``StoreSink.on_round`` with a round's new nodes (one ``INSERT ... ON CONFLICT DO NOTHING``)
and the round's changed statistics (one bulk UPDATE). Both runs go into fresh, identical ``nodes`` tables
(the COPY one in a second database), so indexes and constraints cost the same.

    python bench/store_bulk.py [--nodes 100000] [--round 500] [--admin postgresql://postgres@127.0.0.1/postgres]

Last line: ``store_vs_copy_throughput: X`` (writer nodes/s ÷ COPY nodes/s; target ≥ 0.5).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

import psycopg
from sqlalchemy import create_engine, text

from marco.search.base import SearchConfig
from marco.search.tree import Node, make_id
from marco.store import Store, StoreSink
from marco.store.store import node_to_row
from marco.tasks.base import Problem

COLUMNS = list(node_to_row(Node(id="x", search_id="x", parent_id=None, depth=0, kind="root")))


def admin(url: str, sql: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def make_nodes(search_ids: list[str], total: int) -> list[Node]:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz 0123456789+-=.\n"
    nodes: list[Node] = []
    per = total // len(search_ids)
    for sid in search_ids:
        root = Node(id=make_id(sid, "root"), search_id=sid, parent_id=None, depth=0, kind="root", text="Q" * 200)
        nodes.append(root)
        frontier = [root]
        for i in range(1, per):
            parent = frontier[rng.randrange(len(frontier))]
            node = Node(
                id=make_id(sid, parent.id, i), search_id=sid, parent_id=parent.id, depth=parent.depth + 1,
                kind="ministep", text="".join(rng.choice(alphabet) for _ in range(200)),
                token_ids=[rng.randrange(49152) for _ in range(32)], confidences=[rng.random() for _ in range(32)],
                value=rng.random(), value_sum=rng.random(), visits=rng.randrange(5), round=i // 3, index=i, seq=i,
            )
            nodes.append(node)
            frontier.append(node)
    return nodes


def run_writer(url: str, nodes: list[Node], search_ids: list[str], round_size: int) -> float:
    """Nodes through StoreSink, ``round_size`` new nodes a round, each round also updating the statistics of
    ``round_size // 4`` earlier nodes (as MCTS backpropagation does)."""
    store = Store(create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)))
    sink = StoreSink(store)
    t0 = time.perf_counter()
    for start in range(0, len(nodes), round_size):
        new = nodes[start : start + round_size]
        updated = nodes[max(0, start - round_size // 4) : start]
        sink.on_round(start // round_size, new, updated)
    elapsed = time.perf_counter() - t0
    store.close()
    return elapsed


def run_copy(url: str, nodes: list[Node]) -> float:
    """The same rows through ``COPY nodes (...) FROM STDIN`` (binary-free text COPY, psycopg's fast path)."""
    rows = [node_to_row(n) for n in nodes]
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            with cur.copy(f"COPY nodes ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row([r[c] for c in COLUMNS])
        conn.commit()
        return time.perf_counter() - t0


def fresh_database(admin_url: str) -> str:
    name = f"marco_bench_{uuid.uuid4().hex[:10]}"
    admin(admin_url, f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def prepare(url: str, n_searches: int) -> list[str]:
    store = Store.open(url)
    problems = [Problem("bench", "en", i, "q") for i in range(n_searches)]
    plan = store.create_batch(problems, [SearchConfig(strategy="mcts")], model="bench", chunk_size=n_searches)
    store.close()
    return plan.search_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--searches", type=int, default=100)
    ap.add_argument("--round", type=int, default=500, help="new nodes per lockstep round")
    ap.add_argument("--admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    db_writer, db_copy = fresh_database(args.admin), fresh_database(args.admin)
    try:
        # identical batches (same batch id, so the same search ids) in both databases
        ids_w = prepare(db_writer, args.searches)
        store = Store.open(db_copy)
        problems = [Problem("bench", "en", i, "q") for i in range(args.searches)]
        batch_id = Store.open(db_writer).get_search(ids_w[0]).batch_id
        store.create_batch(problems, [SearchConfig(strategy="mcts")], model="bench", chunk_size=args.searches,
                           batch_id=str(batch_id))
        store.close()
        nodes = make_nodes(ids_w, args.nodes)
        print(f"nodes: {len(nodes)} (200-char text, 32 token ids, 32 confidences), {args.round} per round")

        copy_s = run_copy(db_copy, nodes)
        writer_s = run_writer(db_writer, nodes, ids_w, args.round)
        # a retried job rewrites every round: nothing may be duplicated
        rewrite_s = run_writer(db_writer, nodes, ids_w, args.round)
        check = Store.open(db_writer)
        stored = check.count_nodes()
        check.close()
        assert stored == len(nodes), (stored, len(nodes))

        copy_rate, writer_rate = len(nodes) / copy_s, len(nodes) / writer_s
        print(f"psycopg COPY:          {copy_s:7.2f}s  {copy_rate:9.0f} nodes/s")
        print(f"StoreSink (ON CONFLICT): {writer_s:5.2f}s  {writer_rate:9.0f} nodes/s")
        print(f"StoreSink re-write (all conflicts, no duplicates): {rewrite_s:.2f}s; rows stored: {stored}")
        print(f"store_vs_copy_throughput: {writer_rate / copy_rate:.3f}")
    finally:
        for url in (db_writer, db_copy):
            admin(args.admin, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


if __name__ == "__main__":
    main()
