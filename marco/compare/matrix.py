"""The evaluation matrix read back from its stored batches: the paper's table.

One batch per (model, dataset), written by a pipeline's evaluation stages with ``marco compare``'s label
metadata. Every (model, strategy, budget) is a row of the table and every (dataset, language) a column; a
cell holds accuracy with its 95% Wilson interval, tokens spent and, for MCTS, the mean depth of the trees.
Each cell is paired (exact sign test, exact McNemar with one seed) on the same problems against the base
model's greedy cell and against the trained model's greedy cell (the row's own model when it is trained,
else the last trained one).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from marco.compare.stats import paired_test, wilson_interval
from marco.compare.table import run_keys


@dataclass(frozen=True)
class MatrixSource:
    """One evaluation batch: the model it ran (``key``: base | roundN | a spec; ``model``: its spec)."""

    batch_id: str
    key: str
    model: str
    dataset: str


def _depths(store: Any, search_ids: Sequence[str]) -> dict[str, int]:
    """search id -> the deepest node of its tree."""
    from sqlalchemy import func, select

    from marco.store.models import NodeRow

    out: dict[str, int] = {}
    ids = list(search_ids)
    with store.sessions() as s:
        for i in range(0, len(ids), 500):
            rows = s.execute(select(NodeRow.search_id, func.max(NodeRow.depth))
                             .where(NodeRow.search_id.in_(ids[i:i + 500])).group_by(NodeRow.search_id))  # fmt: skip
            out.update({str(sid): int(d) for sid, d in rows})
    return out


def _pair(cell: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any] | None:
    if base is None or base is cell:
        return None
    common = sorted(set(cell["_scores"]) & set(base["_scores"]))
    t = paired_test([cell["_scores"][p] for p in common], [base["_scores"][p] for p in common])
    return {"model": base["model"], "strategy": base["strategy"], "budget": base["budget"], "wins": t.wins,
            "losses": t.losses, "ties": t.ties, "p": t.p}  # fmt: skip


def build_matrix(store: Any, sources: Sequence[MatrixSource], last_trained: str | None = None) -> list[dict[str, Any]]:
    """The table as a list of cells (one per model, strategy, budget, dataset and language), in matrix order.

    Each cell: ``model`` (spec), ``model_key``, ``strategy`` (the search label as written in the matrix),
    ``dataset``, ``lang``, ``budget``, ``seeds``, ``n`` (problems with a finished search for every seed),
    ``correct`` (problems right; with several seeds the sum of per-problem means), ``accuracy``, ``ci_low``,
    ``ci_high`` (95% Wilson), ``tokens_spent`` (generated tokens per problem, mean), ``failed``,
    ``mean_depth`` (MCTS: the deepest node per tree, mean; None otherwise), ``matched_to`` and
    ``search_budget`` (a strategy run at another's spent tokens: that strategy, and the budget it ran at;
    otherwise None and ``budget``), ``vs_base`` and ``vs_trained``
    (paired tests; None for the reference cell itself or when it is missing). ``last_trained`` is the model
    key of the newest trained model (the reference for rows of untrained models)."""
    cells: dict[tuple[str, str, int, str, str], dict[str, Any]] = {}
    order: list[tuple[str, str, int, str, str]] = []
    for src in sources:
        batch = store.get_batch(src.batch_id)
        pairs = store.batch_rows(src.batch_id)
        keys = run_keys(batch.config or {}, [s for s, _ in pairs])
        meta_runs = ((batch.config or {}).get("compare") or {}).get("runs") or {}
        matched = {(m["strategy"], int(m["budget"])): (m["matched_to"], m["search_budget"])
                   for m in meta_runs.values() if m.get("matched_to")}  # fmt: skip
        scores: dict[tuple[str, int, str], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        tokens: dict[tuple[str, int, str], list[int]] = defaultdict(list)
        failed: dict[tuple[str, int, str], int] = defaultdict(int)
        mcts: dict[tuple[str, int, str], list[str]] = defaultdict(list)
        for s, p in pairs:
            strategy, budget, seed = keys[s.label]
            group = (strategy, budget, s.lang)
            if s.status == "failed":
                failed[group] += 1
                continue
            if s.status != "done":
                continue
            scores[group][seed][f"{p.dataset}/{p.lang}/{p.index}"] = 1.0 if s.correct else 0.0
            tokens[group].append(int(s.tokens or 0))
            if s.strategy == "mcts":
                mcts[group].append(str(s.id))
        if mcts and hasattr(store, "check_batch_not_archived"):
            store.check_batch_not_archived(str(batch.id))  # depths come from the trees: an archived batch says so
        depth = _depths(store, [i for ids in mcts.values() for i in ids])
        meta_order = list(((batch.config or {}).get("compare") or {}).get("strategies") or [])
        rank = {name: i for i, name in enumerate(meta_order)}
        for group in sorted(set(scores) | set(failed), key=lambda g: (rank.get(g[0], len(rank)), g[0], g[1], g[2])):
            strategy, budget, lang = group
            by_seed = scores.get(group, {})
            common = set.intersection(*(set(v) for v in by_seed.values())) if by_seed else set()
            per_problem = {pid: sum(by_seed[sd][pid] for sd in by_seed) / len(by_seed) for pid in common}
            total = sum(per_problem.values())
            n = len(per_problem)
            low, high = wilson_interval(total, n)
            spent = tokens.get(group, [])
            depths = [depth[i] for i in mcts.get(group, []) if i in depth]
            key = (src.key, strategy, budget, src.dataset, lang)
            order.append(key)
            cells[key] = {
                "model": src.model, "model_key": src.key, "strategy": strategy, "dataset": src.dataset, "lang": lang,
                "budget": budget, "seeds": len(by_seed), "n": n,
                "correct": int(total) if float(total).is_integer() else total,
                "accuracy": total / n if n else None, "ci_low": low if n else None, "ci_high": high if n else None,
                "tokens_spent": sum(spent) / len(spent) if spent else 0.0, "failed": failed.get(group, 0),
                "mean_depth": sum(depths) / len(depths) if depths else None,
                "matched_to": matched.get((strategy, budget), (None, None))[0],
                "search_budget": matched.get((strategy, budget), (None, budget))[1], "_scores": per_problem,
            }  # fmt: skip

    def greedy(model_key: str | None, budget: int, dataset: str, lang: str) -> dict[str, Any] | None:
        if model_key is None:
            return None
        found = [c for k, c in cells.items() if k[0] == model_key and k[1] == "greedy" and k[3] == dataset and k[4] == lang]
        same = [c for c in found if c["budget"] == budget]
        return (same or sorted(found, key=lambda c: c["budget"]))[-1] if found else None

    rows: list[dict[str, Any]] = []
    for key in order:
        cell = cells[key]
        trained = cell["model_key"] if cell["model_key"].startswith("round") else last_trained
        cell["vs_base"] = _pair(cell, greedy("base", cell["budget"], cell["dataset"], cell["lang"]))
        cell["vs_trained"] = _pair(cell, greedy(trained, cell["budget"], cell["dataset"], cell["lang"]))
        rows.append(cell)
    for cell in rows:
        cell.pop("_scores")
    return rows
