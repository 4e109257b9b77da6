"""Re-pick the answer of stored MCTS trees with every final pick (``--select``), on the very same trees.

The final pick changes no token of a search, only which answer it returns, so the fairest comparison of
the picks is on identical trees: this reads the MCTS searches of a stored batch (``marco compare``,
``marco run``), rebuilds each tree and scores the answer each pick (value, visits, robust, max-value, vote)
chooses. It prints, per pick, accuracy with a 95% Wilson interval, then paired tests (exact sign test)
of each pick against ``--baseline``, and the trees' mean depth and chosen path depth.

Usage: python scripts/final_pick.py sqlite:///pick.db[#BATCH] [--model smollm2] [--baseline value]
       [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.compare.stats import paired_test, wilson_interval  # noqa: E402
from marco.llm import load_backend  # noqa: E402
from marco.search.base import SELECTIONS, SearchConfig  # noqa: E402
from marco.search.mcts import MCTSSearch  # noqa: E402
from marco.store import Store  # noqa: E402
from marco.store.rows import problem_from_row  # noqa: E402
from marco.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", help="DB_URL[#BATCH] (default: the newest batch)")
    ap.add_argument("--model", default="smollm2", help="backend spec whose tokenizer decodes the trees")
    ap.add_argument("--baseline", default="value", choices=[s for s in SELECTIONS])
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    url, _, batch = args.ref.partition("#")
    store = Store.open(url, upgrade=False)
    batch_id = store.resolve_batch(batch) if batch else store.batches(limit=1)[0].id
    backend = load_backend(args.model)
    rows = [(s, p) for s, p in store.batch_rows(batch_id) if s.strategy == "mcts" and s.status == "done"]
    labels = sorted({s.label for s, _ in rows})
    lines = [f"batch {batch_id}: {len(rows)} MCTS searches ({', '.join(labels)})", "",
             "| final pick | accuracy % | 95% CI | depth tree / path | vs " + args.baseline + " (W/L, p) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    scores: dict[str, list[float]] = {s: [] for s in SELECTIONS}
    depths: dict[str, list[tuple[int, int]]] = {s: [] for s in SELECTIONS}
    nodes = store.load_nodes_many([str(s.id) for s, _ in rows])
    for search, prow in rows:
        problem = problem_from_row(prow)
        task = get_task(problem.dataset)
        for select in SELECTIONS:
            config = SearchConfig.from_dict({**(search.config or {}), "select": select})
            state = MCTSSearch(str(search.id), problem, task, backend, config, nodes[str(search.id)])
            state.done = True
            result = state.result()
            scores[select].append(1.0 if result.correct else 0.0)
            depths[select].append((result.depth, result.path_depth))
    n = len(rows)
    for select in SELECTIONS:
        ok = sum(scores[select])
        low, high = wilson_interval(ok, n)
        tree = sum(d for d, _ in depths[select]) / n
        path = sum(d for _, d in depths[select]) / n
        test = paired_test(scores[select], scores[args.baseline])
        vs = "–" if select == args.baseline else f"{test.wins}/{test.losses}, p = {test.p:.2g}"
        lines.append(f"| {select} | {100 * ok / n:.1f} | {100 * low:.1f}–{100 * high:.1f} | {tree:.1f} / {path:.1f} "
                     f"| {vs} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
