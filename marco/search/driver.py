"""The lockstep driver: many searches advance together, one batched backend call per round.

Every round, each open search plans its requests; the driver sends all of them to the backend in a single
``generate`` call (the pattern rStar-Math uses), hands each search its answers, reports the round's new
and changed nodes to the sink in one batch, and retires the searches that finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from marco.llm.base import Backend, GenerationRequest
from marco.search.base import SearchConfig, SearchResult
from marco.search.linear import BestOfN, GreedySearch, SelfConsistency
from marco.search.mcts import MCTSSearch
from marco.search.sink import NullSink, SearchSink
from marco.search.state import SearchState
from marco.search.tree import Node, make_id
from marco.tasks.base import Problem, Task

STATES: dict[str, type[SearchState]] = {
    "greedy": GreedySearch,
    "sc": SelfConsistency,
    "bon": BestOfN,
    "mcts": MCTSSearch,
}


@dataclass
class DriverStats:
    """Where the driver's time went (the benchmark and the store's overhead report read this)."""

    rounds: int = 0
    backend_calls: int = 0
    rows: int = 0
    generated_tokens: int = 0
    generate_s: float = 0.0
    sink_s: float = 0.0
    total_s: float = 0.0
    widths: list[int] = field(default_factory=list)


class LockstepDriver:
    """Runs the searches of many problems in lockstep."""

    def __init__(
        self, backend: Backend, task: Task, config: SearchConfig, sink: SearchSink | None = None,
        continuous: bool = True,
    ) -> None:
        self.backend = backend
        # continuous batching when the backend offers it: a search moves to its next round as soon as its
        # own requests are done, while the other searches' rows keep decoding
        self.continuous = continuous and getattr(backend, "generate_continuous", None) is not None
        self.task = task
        self.config = config
        self.sink: SearchSink = sink or NullSink()
        self.stats = DriverStats()

    def make_state(self, search_id: str, problem: Problem, nodes: Sequence[Node] | None = None) -> SearchState:
        return STATES[self.config.strategy](search_id, problem, self.task, self.backend, self.config, nodes)

    def run(
        self,
        problems: Sequence[Problem],
        search_ids: Sequence[str] | None = None,
        resume: dict[str, list[Node]] | None = None,
        on_progress: Callable[[SearchResult], None] | None = None,
    ) -> list[SearchResult]:
        """Search every problem; results come back in the order of ``problems``."""
        t0 = time.perf_counter()
        ids = list(search_ids) if search_ids is not None else [
            make_id("search", "local", p.key, self.config.label, self.config.seed) for p in problems
        ]
        if len(ids) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(ids)} search ids")
        resume = resume or {}
        states = [self.make_state(sid, p, resume.get(sid)) for sid, p in zip(ids, problems)]
        results: dict[str, SearchResult] = {}
        if self.continuous:
            self._run_continuous(states, results, on_progress)
            self.stats.total_s += time.perf_counter() - t0
            return [results[sid] for sid in ids]
        open_states = list(states)
        while open_states:
            batch: list[GenerationRequest] = []
            owners: list[tuple[SearchState, int, int]] = []
            for s in open_states:
                reqs = s.plan() if not s.done else []
                owners.append((s, len(batch), len(reqs)))
                batch.extend(reqs)
            if batch:
                t = time.perf_counter()
                gens = self.backend.generate(batch)
                self.stats.generate_s += time.perf_counter() - t
                self.stats.backend_calls += 1
                rows = sum(r.n for r in batch)
                self.stats.rows += rows
                self.stats.widths.append(rows)
                self.stats.generated_tokens += sum(g.num_tokens for gs in gens for g in gs)
                for s, start, count in owners:
                    if count:
                        s.absorb(gens[start : start + count])
            self._report(open_states, results, on_progress)
            open_states = [s for s in open_states if not s.done]
        self.stats.total_s += time.perf_counter() - t0
        return [results[sid] for sid in ids]

    def _report(
        self, states: Sequence[SearchState], results: dict[str, SearchResult],
        on_progress: Callable[[SearchResult], None] | None,
    ) -> None:
        """Send the states' new nodes to the sink in one call, then their results if they finished."""
        new: list[Node] = []
        touched: list[Node] = []
        for s in states:
            n, u = s.drain()
            new.extend(n)
            touched.extend(u)
        done_results = [s.result() for s in states if s.done and s.search_id not in results]
        self.stats.rounds += 1
        t = time.perf_counter()
        if new or touched:
            self.sink.on_round(self.stats.rounds, new, touched)
        if done_results:
            self.sink.on_finish(done_results)
        self.stats.sink_s += time.perf_counter() - t
        for r in done_results:
            results[r.search_id] = r
            if on_progress is not None:
                on_progress(r)

    def _run_continuous(
        self, states: list[SearchState], results: dict[str, SearchResult],
        on_progress: Callable[[SearchResult], None] | None,
    ) -> None:
        owner: dict[int, tuple[SearchState, int]] = {}  # request id -> (search, position in its plan)
        waiting: dict[int, list] = {}  # id(search) -> generations of its current plan
        next_id = 0

        def plan(batch_states: Sequence[SearchState]) -> list[GenerationRequest]:
            nonlocal next_id
            out: list[GenerationRequest] = []
            for s in batch_states:
                reqs: list[GenerationRequest] = []
                while not s.done and not reqs:
                    reqs = s.plan()
                waiting[id(s)] = [None] * len(reqs)
                for k, r in enumerate(reqs):
                    owner[next_id] = (s, k)
                    next_id += 1
                    out.append(r)
            return out

        def refill(done: list) -> list[GenerationRequest]:  # type: ignore[type-arg]
            t = time.perf_counter()
            ready: list[SearchState] = []
            for rid, gens in done:
                s, k = owner.pop(rid)
                slot = waiting[id(s)]
                slot[k] = gens
                self.stats.rows += len(gens)
                self.stats.generated_tokens += sum(g.num_tokens for g in gens)
                if all(g is not None for g in slot):
                    s.absorb(slot)
                    ready.append(s)
            new = plan(ready)
            self._report(ready, results, on_progress)
            self.stats.widths.append(sum(r.n for r in new))
            bookkeeping[0] += time.perf_counter() - t
            return new

        bookkeeping = [0.0]
        first = plan(states)
        self._report(states, results, on_progress)  # roots (and searches already finished on resume)
        t = time.perf_counter()
        if first:
            self.stats.widths.append(sum(r.n for r in first))
            self.stats.backend_calls += 1
            self.backend.generate_continuous(first, refill)  # type: ignore[attr-defined]
        self.stats.generate_s += time.perf_counter() - t - bookkeeping[0]
        leftover = [s for s in states if s.search_id not in results]
        for s in leftover:  # nothing left to generate for them
            s.done = True
        if leftover:
            self._report(leftover, results, on_progress)
