"""A stored batch read back as a comparison: per strategy and budget, accuracy with its 95% interval,
tokens actually spent, wall time, and a paired test against a baseline on the same problems.

Searches are grouped by the stored config, never by parsing label text: a batch written by
``marco compare`` maps each search label to (strategy, budget, seed) under ``config["compare"]``; any other
batch groups by label, with the budget and seed read from the search's stored config.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from marco.compare.stats import Paired, paired_test, wilson_interval
from marco.store.db import StoreError
from marco.store.store import Store

INTERVAL = "Wilson score, n = problems (seeds averaged per problem)"
PAIRED_TEST = "exact sign test on per-problem scores (exact McNemar with one seed)"


@dataclass
class CompareRow:
    """One strategy at one budget, over every seed."""

    strategy: str
    budget: int
    seeds: int
    problems: int  # problems with a finished search for every seed
    failed: int  # searches that failed
    accuracy: float  # mean over seeds and problems
    low: float  # 95% interval
    high: float
    tokens_per_problem: float  # generated tokens actually spent, mean over searches
    wall_s: float  # wall time of this config's searches (per job the longest search, summed), all seeds
    tree_depth: float | None = None  # mean over searches of the tree's deepest node (None: not stored)
    path_depth: float | None = None  # mean over searches of the depth of the chosen answer's path
    scores: dict[str, float] = field(default_factory=dict, repr=False)  # problem id -> mean score over seeds

    @property
    def key(self) -> str:
        return f"{self.strategy}@{self.budget}"


@dataclass
class PairedRow:
    strategy: str
    budget: int
    baseline: str
    baseline_budget: int
    test: Paired


@dataclass
class Comparison:
    batch_id: str
    name: str
    dataset: str | None
    status: str
    baseline: str
    rows: list[CompareRow]
    paired: list[PairedRow]
    wall_s: float | None = None
    interval: str = INTERVAL
    paired_test: str = PAIRED_TEST

    def row(self, strategy: str, budget: int) -> CompareRow | None:
        return next((r for r in self.rows if r.strategy == strategy and r.budget == budget), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row in out["rows"]:
            row.pop("scores", None)
        return out


def run_keys(batch_config: dict[str, Any], searches: list) -> dict[str, tuple[str, int, int]]:  # type: ignore[type-arg]
    """label -> (strategy, budget, seed)."""
    meta = (batch_config.get("compare") or {}).get("runs") or {}
    keys: dict[str, tuple[str, int, int]] = {}
    for s in searches:
        if s.label in keys:
            continue
        if s.label in meta:
            m = meta[s.label]
            keys[s.label] = (str(m["strategy"]), int(m["budget"]), int(m["seed"]))
        else:
            cfg = s.config or {}
            keys[s.label] = (s.label, int(cfg.get("budget", 0)), int(cfg.get("seed", 0)))
    return keys


def build_comparison(store: Store, batch_id: str, baseline: str | None = None) -> Comparison:
    """The comparison of a stored batch; ``baseline`` (default: the batch's, else greedy) is the strategy every
    other one is paired against, at the same budget (or at its largest budget when it ran at one only).
    Raises :class:`StoreError` when an explicit ``baseline`` is not a strategy of the batch."""
    explicit = baseline is not None
    batch = store.get_batch(batch_id)
    pairs = store.batch_rows(batch_id)
    searches = [s for s, _ in pairs]
    keys = run_keys(batch.config or {}, searches)
    meta = (batch.config or {}).get("compare") or {}
    order = list(meta.get("strategies") or [])
    baseline = baseline or meta.get("baseline") or "greedy"

    # (strategy, budget) -> seed -> problem id -> score; and the cost per group
    scores: dict[tuple[str, int], dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    failed: dict[tuple[str, int], int] = defaultdict(int)
    tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
    longest: dict[tuple[str, int], dict[tuple[int, str], float]] = defaultdict(dict)
    depths: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for s in searches:
        strategy, budget, seed = keys[s.label]
        group = (strategy, budget)
        if s.status == "failed":
            failed[group] += 1
            continue
        if s.status != "done":
            continue
        scores[group][seed][str(s.problem_id)] = 1.0 if s.correct else 0.0
        tokens[group].append(int(s.tokens))
        if s.tree_depth is not None and s.path_depth is not None:  # searches stored before 0006 have none
            depths[group].append((int(s.tree_depth), int(s.path_depth)))
        job = (seed, str(s.job_id))
        longest[group][job] = max(longest[group].get(job, 0.0), float(s.elapsed_s or 0.0))

    rows: list[CompareRow] = []
    for group in set(scores) | set(failed):
        by_seed = scores.get(group, {})
        # problems every seed finished, so seeds and strategies are compared on the same problems
        common = set.intersection(*(set(v) for v in by_seed.values())) if by_seed else set()
        per_problem = {pid: sum(by_seed[seed][pid] for seed in by_seed) / len(by_seed) for pid in common}
        total = sum(per_problem.values())
        low, high = wilson_interval(total, len(per_problem))
        spent = tokens.get(group, [])
        deep = depths.get(group, [])
        rows.append(CompareRow(
            strategy=group[0], budget=group[1], seeds=len(by_seed), problems=len(per_problem),
            failed=failed.get(group, 0), accuracy=total / len(per_problem) if per_problem else 0.0,
            low=low, high=high, tokens_per_problem=sum(spent) / len(spent) if spent else 0.0,
            wall_s=sum(longest.get(group, {}).values()), scores=per_problem,
            tree_depth=sum(d for d, _ in deep) / len(deep) if deep else None,
            path_depth=sum(d for _, d in deep) / len(deep) if deep else None,
        ))
    rank = {name: i for i, name in enumerate(order)}
    rows.sort(key=lambda r: (rank.get(r.strategy, len(rank)), r.strategy, r.budget))
    names = list(dict.fromkeys(r.strategy for r in rows))
    if explicit and names and baseline not in names:
        raise StoreError(f"baseline {baseline!r} is not a strategy of this batch; it has: {', '.join(names)}")

    paired: list[PairedRow] = []
    base_rows = {r.budget: r for r in rows if r.strategy == baseline}
    for row in rows:
        if row.strategy == baseline or not base_rows:
            continue
        base = base_rows.get(row.budget) or base_rows[max(base_rows)]
        common = sorted(set(row.scores) & set(base.scores))
        test = paired_test([row.scores[p] for p in common], [base.scores[p] for p in common])
        paired.append(PairedRow(row.strategy, row.budget, baseline, base.budget, test))

    wall = None
    if batch.started_at and batch.finished_at:
        wall = (batch.finished_at - batch.started_at).total_seconds()
    return Comparison(batch_id=str(batch.id), name=batch.name, dataset=batch.dataset, status=batch.status,
                      baseline=baseline, rows=rows, paired=paired, wall_s=wall)


def is_comparison(batch_config: dict[str, Any]) -> bool:
    """Whether a batch was written by ``marco compare``."""
    return bool((batch_config or {}).get("compare"))
