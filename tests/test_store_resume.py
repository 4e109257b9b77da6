"""A search interrupted after round r resumes from the store and ends exactly like an uninterrupted run."""

from __future__ import annotations

from typing import Sequence

import pytest

from marco.jobs import BackendCache, execute_job
from marco.llm.base import Backend, Generation, GenerationRequest
from marco.llm.scripted import ScriptedBackend
from marco.search.base import SearchConfig
from marco.search.driver import LockstepDriver
from marco.search.sink import RecordingSink
from marco.store import Store
from marco.tasks import get_task
from marco.tasks.base import Problem

FIELDS = ("id", "parent_id", "depth", "kind", "text", "token_ids", "confidences", "value", "value_sum", "visits",
          "terminal", "answer", "seq", "index")


class CrashAfter:
    """Delegates to ``backend`` for ``calls`` generate() calls, then dies like a killed worker."""

    def __init__(self, backend: Backend, calls: int) -> None:
        self.backend, self.calls, self.name = backend, calls, backend.name

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        if self.calls == 0:
            raise RuntimeError("worker killed")
        self.calls -= 1
        return self.backend.generate(requests)

    def generate_continuous(self, requests, refill) -> None:
        if getattr(self.backend, "generate_continuous", None) is None:
            raise AttributeError("generate_continuous")

        def dying_refill(done):
            if self.calls == 0:
                raise RuntimeError("worker killed")
            self.calls -= 1
            return refill(done)

        return self.backend.generate_continuous(requests, dying_refill)

    def __getattr__(self, name: str):  # encode, decode, apply_chat_template
        return getattr(self.backend, name)


def _snapshot(nodes) -> list[tuple]:
    return [tuple(getattr(n, f) for f in FIELDS) for n in sorted(nodes, key=lambda n: n.seq)]


def _same_trees(stored, reference, tolerance: float | None) -> bool:
    """Equal node by node; with ``tolerance``, floats may differ by that much (a real model's cached
    prefixes may have been computed in another batch, which moves log-probabilities in their last bits;
    every token, id, text and count must still be identical)."""
    left, right = _snapshot(stored), _snapshot(reference)
    if tolerance is None or len(left) != len(right):
        return left == right

    def close(u, v) -> bool:
        if isinstance(u, float) and isinstance(v, float):
            return abs(u - v) <= tolerance
        if isinstance(u, list) and isinstance(v, list) and len(u) == len(v) and u and isinstance(u[0], float):
            return all(abs(a - b) <= tolerance for a, b in zip(u, v))
        return u == v

    return all(close(u, v) for x, y in zip(left, right) for u, v in zip(x, y))


def _check_resume(store: Store, backend: Backend, problems: list[Problem], config: SearchConfig, crash_after: int,
                  spec: str, tolerance: float | None = None) -> None:
    plan = store.create_batch(problems, [config], model=spec, task="mgsm", chunk_size=len(problems))
    job = plan.job_ids[0]

    # the uninterrupted run, in memory, with the same search ids
    reference = LockstepDriver(backend, get_task("mgsm"), config, RecordingSink()).run(problems, plan.search_ids)
    assert max(r.rounds for r in reference) > crash_after, "the crash must happen mid-search"

    crashed = BackendCache()
    crashed.put(spec, CrashAfter(backend, crash_after))
    first = execute_job(store, job, crashed, worker="w1")
    assert first.status == "failed" and "worker killed" in (first.error or "")
    partial = sum(store.count_nodes(sid) for sid in plan.search_ids)
    assert 0 < partial < sum(len(r.tree) for r in reference)

    assert store.requeue_failed(plan.batch_id) == [job]
    healthy = BackendCache()
    healthy.put(spec, backend)
    second = execute_job(store, job, healthy, worker="w2")
    assert second.status == "done", second.error
    assert second.attempts == 2

    for ref in reference:
        assert _same_trees(store.load_nodes(ref.search_id), ref.tree, tolerance), ref.search_id
        row = store.get_search(ref.search_id)
        assert row.status == "done"
        assert row.final_answer == ref.answer and row.final_node_id == ref.final_node_id
        assert row.correct == ref.correct and row.tokens == ref.tokens
        assert row.chosen_path == ref.chosen_path
    assert store.batch_progress(plan.batch_id).status == "done"


@pytest.mark.parametrize("crash_after", [1, 3])
def test_resume_equals_uninterrupted_scripted(store: Store, crash_after: int) -> None:
    problems = [Problem("mgsm", "en", i, f"What is 40 + {i}?", ("42",)) for i in range(3)]
    # budget 1000: the search stops when the budget cannot pay for a typical rollout, so it must last > 3 rounds
    config = SearchConfig(strategy="mcts", action="ministep:6", budget=1000, children=2, max_rounds=12, seed=7,
                          reflect=True)
    _check_resume(store, ScriptedBackend(), problems, config, crash_after, spec="scripted")


def test_malformed_problem_fails_its_search_and_the_job_goes_on(store: Store) -> None:
    problems = [Problem("mgsm", "en", 0, "What is 40 + 2?", ("42",)),
                Problem("mgsm", "en", 1, "", (), error="line 2: missing answer column")]
    plan = store.create_batch(problems, [SearchConfig(strategy="greedy", budget=200)], model="scripted", chunk_size=2)
    backends = BackendCache()
    backends.put("scripted", ScriptedBackend())
    outcome = execute_job(store, plan.job_ids[0], backends, worker="w")
    # the job fails with the malformed row's reason, after searching the well-formed problem
    assert outcome.status == "failed" and outcome.searches == 2
    assert "mgsm/en/1: line 2: missing answer column" in (outcome.error or "")
    good, bad = (store.get_search(s) for s in plan.search_ids)
    assert good.status == "done" and good.final_answer is not None
    assert bad.status == "failed" and bad.error == "line 2: missing answer column"
    assert store.count_nodes(bad.id) == 0
    # a job that already ended is not run again
    assert execute_job(store, plan.job_ids[0], backends, worker="w2").status == "skipped"


@pytest.mark.slow
def test_resume_equals_uninterrupted_real_model(tmp_path, smollm2_backend: Backend) -> None:
    # SQLite only: the database round trip is covered on both by the scripted test; this one checks that
    # real tokenizer ids, logprob floats and seeded sampling survive a crash and a resume.
    store = Store.open(f"sqlite:///{tmp_path / 'real.db'}")
    problems = [Problem("mgsm", "en", 0, "Tom has 3 apples and buys 2 more. How many apples does he have?", ("5",))]
    config = SearchConfig(strategy="mcts", action="ministep:8", budget=96, children=2, max_rounds=4, seed=1,
                          max_answer_tokens=24, max_step_tokens=16)
    _check_resume(store, smollm2_backend, problems, config, crash_after=1, spec="smollm2", tolerance=1e-4)


@pytest.fixture(scope="module")
def smollm2_backend(smollm2) -> Backend:
    return smollm2  # the session's one loaded model (tests/conftest.py)
