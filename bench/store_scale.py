"""A store at scale: 1,000,000 nodes (10,000 searches in 100 batches) written through the project's writer
into a fresh Postgres database, then the explorer's and `marco traces`' read queries timed on it.

Batches are planned with ``Store.create_batch`` (MGSM-like problems in 10 languages, two search configs);
each batch's searches are written in lockstep rounds through ``StoreSink.on_round`` (new nodes plus the
visit/value updates of earlier ones, as MCTS backpropagation does) and finished with ``on_finish``. Nodes
look like the real ones: ``ministep:32`` nodes of 32 token ids, 32 confidences and ~130 characters of text,
reflection and answer nodes among them, ~100 nodes per search.

    python bench/store_scale.py [--nodes 1000000] [--batches 100] [--repeat 7] [--keep]
                                [--admin postgresql://postgres@127.0.0.1:5432/postgres]

Prints rows/s written, bytes per node (``pg_total_relation_size('nodes') / rows``), each query's median
and worst time over ``--repeat`` runs, and last ``slowest_trace_query_ms: X`` (the slowest median; goal
< 200 ms). The database (``marco_scale_<random>``) is created here and dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from typing import Any, Callable

import numpy as np
from sqlalchemy import create_engine, text

from marco.report.tables import batch_report
from marco.search.base import SearchConfig, SearchResult
from marco.search.tree import Node, Tree, make_id
from marco.store import Store, StoreSink
from marco.tasks.base import Problem, Score
from marco.ui.queries import Explorer, SearchFilter

LANGS = ["en", "zh", "fr", "de", "es", "ja", "ru", "th", "sw", "bn"]
CONFIGS = [SearchConfig(strategy="mcts", action="ministep:32", budget=4096, children=3),
           SearchConfig(strategy="mcts", action="ministep:32", reflect=True, budget=4096, children=3)]
# Subword-sized pieces, so 32 tokens make ~130 characters as SmolLM2's do on MGSM reasoning.
PIECES = ("The", " number", " of", " apples", " is", " 12", ".", " So", " we", " have", " 3", " +", " 4", " =",
          " 7", "\n", " Let", "'s", " compute", " each", " step", ":", " Janet", " sells", " eggs", " for", " $",
          "2", " per", " day", ",", " total", " 16", " -", " 9", " The", " answer", " multiply", " by", " then",
          " remaining", " half", " cost", " dollars", " Wait", "!", " check", " again", " *", " 18", " ducks")
QUESTION = ("Janet's ducks lay {a} eggs per day. She eats {b} for breakfast every morning and bakes muffins for "
            "her friends every day with {c}. She sells the remainder at the farmers' market daily for ${d} per "
            "fresh duck egg. How much in dollars does she make every day at the farmers' market? (item {i})")


def admin(url: str, sql: str) -> None:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(sql))
    engine.dispose()


def batch_problems(b: int, n: int) -> list[Problem]:
    rng = random.Random(b)
    out = []
    for i in range(n):
        a, bb, c, d = rng.randrange(10, 30), rng.randrange(1, 5), rng.randrange(1, 5), rng.randrange(2, 9)
        answer = (a - bb - c) * d
        # every batch asks the same 250 items (as re-runs of one dataset do), so "related" finds 99 others
        out.append(Problem("mgsm", LANGS[i % len(LANGS)], i, QUESTION.format(a=a, b=bb, c=c, d=d, i=i), (str(answer),)))
    return out


def search_tree(sid: str, n_nodes: int, rng: np.random.Generator) -> list[Node]:
    """One MCTS-shaped tree: a root, ministep nodes (children of 3 under a random expanded node), ~5%
    reflections, answer leaves (~10%)."""
    nodes = [Node(id=make_id(sid, "root"), search_id=sid, parent_id=None, depth=0, kind="root", visits=n_nodes)]
    toks = rng.integers(0, 49152, size=(n_nodes, 32))
    confs = np.clip(rng.beta(6, 1.4, size=(n_nodes, 32)), 1e-4, 1.0)
    words = rng.integers(0, len(PIECES), size=(n_nodes, 32))
    kinds = rng.random(n_nodes)
    open_nodes = [nodes[0]]
    for i in range(1, n_nodes):
        parent = open_nodes[int(rng.integers(len(open_nodes)))]
        kind = "reflection" if kinds[i] < 0.05 else ("answer" if kinds[i] > 0.9 else "ministep")
        c = confs[i].tolist()
        node = Node(
            id=make_id(sid, parent.id, i), search_id=sid, parent_id=parent.id, depth=parent.depth + 1, kind=kind,  # type: ignore[arg-type]
            text="".join(PIECES[w] for w in words[i]), token_ids=toks[i].tolist(), confidences=c,
            value=sum(c) / 32, value_sum=sum(c) / 32, visits=1, terminal=kind == "answer",
            answer=str(int(toks[i][0]) % 100) if kind == "answer" else None, round=i // 3, index=i % 3, seq=i,
        )
        nodes.append(node)
        if kind != "answer" and node.depth < 12:
            open_nodes.append(node)
    return nodes


def write_batch(store: Store, b: int, searches: int, nodes_per_search: int, rng: np.random.Generator) -> tuple[int, float]:
    """Plan one batch and write all its searches through the sink, round by round; (nodes, seconds writing)."""
    problems = batch_problems(b, searches // len(CONFIGS))
    plan = store.create_batch(problems, CONFIGS, name=f"scale-{b:03d}", dataset="mgsm", model="scripted", task="mgsm",
                              chunk_size=len(problems))
    by_problem = {make_id("problem", plan.batch_id, p.key): p for p in problems}
    trees = {sid: search_tree(sid, nodes_per_search, rng) for sid in plan.search_ids}
    sink = StoreSink(store)
    per_round = 3 * 8  # a lockstep round adds k=3 children to ~8 nodes of every search of the job
    for r, start in enumerate(range(0, nodes_per_search, per_round)):
        new = [n for t in trees.values() for n in t[start : start + per_round]]
        updated = [n for t in trees.values() for n in t[max(0, start - per_round // 2) : start]]
        sink.on_round(r, new, updated)
    results = []
    searches_rows = store.job_searches(plan.job_ids[0])
    for row in searches_rows:
        sid = str(row.id)
        tree = trees[sid]
        leaf = next((n for n in reversed(tree) if n.kind == "answer"), tree[-1])
        path, cur = [], leaf
        index = {n.id: n for n in tree}
        while cur is not None:
            path.append(cur.id)
            cur = index.get(cur.parent_id) if cur.parent_id else None
        problem = by_problem[str(row.problem_id)]
        correct = bool(rng.random() < 0.45)
        results.append(SearchResult(
            search_id=sid, problem=problem, config=CONFIGS[0] if row.label == CONFIGS[0].label else CONFIGS[1],
            tree=Tree(search_id=sid), final_node_id=leaf.id,
            answer=problem.references[0] if correct else leaf.answer, confidence=leaf.value,
            tokens=32 * nodes_per_search, rounds=nodes_per_search // per_round, elapsed_s=float(rng.random() * 30),
            score=Score(correct, float(correct)), chosen_path=path[::-1],
        ))
    sink.on_finish(results)
    return sink.nodes_written, sink.write_s


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm: the first call pays for imports and plan caching, not the store
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times), max(times)


def index_effect(store: Store, repeat: int) -> tuple[float, float]:
    """The newest-first page's SQL with migration 0004's index and, in a rolled-back transaction, without it."""
    page = text("SELECT s.*, p.question FROM searches s JOIN problems p ON s.problem_id = p.id "
                "ORDER BY s.created_at DESC, s.id LIMIT 50")
    with store.engine.connect() as conn:
        with conn.begin() as tx:
            with_ix = timed(lambda: conn.execute(page).all(), repeat)[0]
            conn.execute(text("DROP INDEX ix_searches_created_at"))
            without_ix = timed(lambda: conn.execute(page).all(), repeat)[0]
            tx.rollback()
    return with_ix, without_ix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1_000_000, help="Nodes in all (default 1,000,000).")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--nodes-per-search", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7, help="Timed runs per query (median reported).")
    ap.add_argument("--admin", default=os.environ.get("MARCO_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--keep", action="store_true", help="Keep the database (its URL is printed).")
    args = ap.parse_args()
    searches = args.nodes // args.nodes_per_search
    per_batch = max(len(CONFIGS), searches // args.batches // len(CONFIGS) * len(CONFIGS))
    name = f"marco_scale_{uuid.uuid4().hex[:10]}"
    url = f"{args.admin.rsplit('/', 1)[0]}/{name}"
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus)")
    print(f"database {name}: {args.batches} batches x {per_batch} searches x {args.nodes_per_search} nodes")
    admin(args.admin, f'CREATE DATABASE "{name}"')
    try:
        store = Store.open(url)
        rng = np.random.default_rng(0)
        written, write_s, t0 = 0, 0.0, time.perf_counter()
        for b in range(args.batches):
            n, s = write_batch(store, b, per_batch, args.nodes_per_search, rng)
            written += n
            write_s += s
            if (b + 1) % max(1, args.batches // 10) == 0:
                print(f"  {b + 1}/{args.batches} batches, {written:,} nodes, writer {written / write_s:,.0f} nodes/s", flush=True)
        wall = time.perf_counter() - t0
        with store.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            total = conn.execute(text("SELECT pg_total_relation_size('nodes')")).scalar_one()
            heap = conn.execute(text("SELECT pg_relation_size('nodes')")).scalar_one()
            rows = conn.execute(text("SELECT count(*) FROM nodes")).scalar_one()
            n_searches = conn.execute(text("SELECT count(*) FROM searches")).scalar_one()
            db_size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            dead = conn.execute(text("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'nodes'")).scalar_one()
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar_one()
        print(f"wrote {rows:,} nodes of {n_searches:,} searches: writer {written / write_s:,.0f} rows/s "
              f"({write_s:.1f}s in StoreSink; {wall:.1f}s wall incl. generating the trees)")
        print(f"bytes per node: {total / rows:,.0f} (heap {heap / rows:,.0f}, indexes+toast {(total - heap) / rows:,.0f}); "
              f"database {db_size / 2**20:,.0f} MiB")
        # every node is updated once after its insert (backpropagation), so the heap holds a dead version of
        # it until (auto)vacuum reclaims the space for reuse
        print(f"dead node versions: {dead:,} (autovacuum {autovacuum})")

        explorer = Explorer(store.engine)
        mid = explorer.resolve_batch(f"scale-{args.batches // 2:03d}")
        sid = str(store.find_searches(mid, limit=None)[per_batch // 2].id)
        deepest = max(store.load_nodes(sid), key=lambda n: n.depth).id
        queries: dict[str, Callable[[], Any]] = {
            "ui batches (all, with accuracy)": explorer.batches,
            "ui batch (label x language)": lambda: explorer.batch(mid),
            "ui searches, no filter, page 1": lambda: explorer.searches(SearchFilter()),
            "ui searches, no filter, page 100": lambda: explorer.searches(SearchFilter(page=100)),
            "ui searches, batch+strategy+lang+wrong+conf": lambda: explorer.searches(SearchFilter(
                batch=mid, strategy=CONFIGS[1].label, lang="fr", correct=False, conf_min=0.5, conf_max=0.95)),
            "ui searches, strategy+lang over all batches": lambda: explorer.searches(SearchFilter(strategy="mcts", lang="sw")),
            "ui searches, question text": lambda: explorer.searches(SearchFilter(text="(item 17)")),
            "ui filter choices (facets)": lambda: explorer.facets(),
            "ui tree (search + nodes)": lambda: explorer.search(sid),
            "ui same problem elsewhere": lambda: explorer.related(sid),
            "traces list --batch --lang --strategy --wrong": lambda: store.find_searches(mid, None, "fr", "mcts", False, 50),
            "traces list (newest 50)": lambda: store.find_searches(limit=50),
            "traces show (load_nodes)": lambda: (store.get_search(sid), store.load_nodes(sid)),
            "traces path (root to deepest)": lambda: store.path_nodes(deepest),
            "report BATCH (batch_report)": lambda: batch_report(store, mid),
        }
        print(f"\n{'query':48s} {'median ms':>10s} {'max ms':>8s}   ({args.repeat} runs each)")
        medians = {}
        for label, fn in queries.items():
            med, worst = timed(fn, args.repeat)
            medians[label] = med
            print(f"{label:48s} {med:10.1f} {worst:8.1f}")
        with_ix, without_ix = index_effect(store, args.repeat)
        print(f"\nnewest-first page (SQL only): {with_ix:.2f} ms with ix_searches_created_at, {without_ix:.2f} ms "
              f"without: {without_ix / with_ix:.0f}x")
        slowest = max(medians, key=medians.get)  # type: ignore[arg-type]
        print(f"\nslowest: {slowest}; load average at end: {os.getloadavg()[0]:.2f}")
        store.close()
        if args.keep:
            print(f"kept {url}")
        print(f"slowest_trace_query_ms: {medians[slowest]:.1f}")
    finally:
        if not args.keep:
            admin(args.admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
