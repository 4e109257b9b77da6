"""Pool replicate `marco compare` batches of the same problems into one table and one set of paired tests.

`marco compare --seeds N` is the way to run replicates in one batch. This script is for replicates that
ran as separate batches (another day, another database): every batch must hold the same problems (same
dataset, language and index; problem ids differ between batches). Sampling seeds derive from the node ids,
which include the batch, so two batches of the same settings are independent replicates.

For each strategy and budget present in every batch it prints the accuracy over problems of each
problem's mean score across replicates (95% Wilson interval with n = problems, as `marco compare
--seeds` reports it), tokens spent per search, and paired tests (exact sign test on per-problem mean
scores) of each strategy against ``--baseline`` and of each ``--pair A:B``.

Usage: python scripts/pool_compare.py sqlite:///a.db sqlite:///b.db[#BATCH] ... [--baseline greedy]
       [--pair "mcts:ministep:32/t=0.3/c=0.3:sc/t=0.3"] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.compare.stats import paired_test, wilson_interval  # noqa: E402
from marco.compare.table import build_comparison  # noqa: E402
from marco.store import Store  # noqa: E402
from marco.store.models import ProblemRow  # noqa: E402

Key = tuple[str, int]  # (strategy, budget)


def load(ref: str) -> tuple[dict[Key, dict[tuple, float]], dict[Key, float]]:
    """One batch: per (strategy, budget), problem (dataset, lang, index) -> mean score; and tokens spent."""
    url, _, batch = ref.partition("#")
    store = Store.open(url, upgrade=False)
    batch_id = store.resolve_batch(batch) if batch else store.batches(limit=1)[0].id
    comp = build_comparison(store, batch_id)
    with store.sessions() as s:
        rows = s.execute(select(ProblemRow.id, ProblemRow.dataset, ProblemRow.lang, ProblemRow.index)
                         .where(ProblemRow.batch_id == batch_id)).all()
    where = {str(r.id): (r.dataset, r.lang, r.index) for r in rows}
    scores = {(r.strategy, r.budget): {where[p]: v for p, v in r.scores.items()} for r in comp.rows}
    tokens = {(r.strategy, r.budget): r.tokens_per_problem for r in comp.rows}
    return scores, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("batches", nargs="+", help="URL[#BATCH] of each replicate (default: the URL's newest batch)")
    ap.add_argument("--baseline", default="greedy")
    ap.add_argument("--pair", action="append", default=[], help="A:B, strategy A paired against B (repeatable); "
                    "split at the last ':' that is followed by a known strategy")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()

    loaded = [load(ref) for ref in args.batches]
    keys = sorted(set.intersection(*(set(s) for s, _ in loaded)), key=lambda k: (k[1], k[0]))
    pooled: dict[Key, dict[tuple, float]] = {}
    lines = ["| strategy | budget | replicates | problems | accuracy % | 95% CI | tokens spent/search |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in keys:
        per = [s[key] for s, _ in loaded]
        common = set.intersection(*(set(p) for p in per))
        pooled[key] = {p: sum(x[p] for x in per) / len(per) for p in common}
        total = sum(pooled[key].values())
        low, high = wilson_interval(total, len(common))  # n = problems, as marco compare does with --seeds
        spent = sum(t[key] for _, t in loaded) / len(loaded)
        lines.append(f"| {key[0]} | {key[1]} | {len(per)} | {len(common)} | {100 * total / len(common):.1f}"
                     f" | {100 * low:.1f}–{100 * high:.1f} | {spent:.0f} |")
    names = sorted({k[0] for k in keys}, key=len, reverse=True)
    pairs = [(k[0], args.baseline) for k in keys if k[0] != args.baseline]
    for text in args.pair:
        b = next((n for n in names if text.endswith(":" + n)), None)
        if b is None:
            sys.exit(f"--pair {text!r}: B must be one of {', '.join(names)}")
        pairs.append((text[: -len(b) - 1], b))
    lines += ["", "| strategy | vs | budget | wins | losses | ties | p |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for budget in sorted({k[1] for k in keys}):
        for a, b in dict.fromkeys(pairs):
            if (a, budget) not in pooled or (b, budget) not in pooled:
                continue
            common = sorted(set(pooled[(a, budget)]) & set(pooled[(b, budget)]))
            t = paired_test([pooled[(a, budget)][p] for p in common], [pooled[(b, budget)][p] for p in common])
            lines.append(f"| {a} | {b} | {budget} | {t.wins} | {t.losses} | {t.ties} | {t.p:.3g} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
