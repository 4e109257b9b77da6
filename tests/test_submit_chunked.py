"""A large batch is written in chunks while workers claim its first jobs (issue 18, "bad days at scale")."""

from __future__ import annotations

import queue
import statistics
import threading
import time

import pytest

from marco.search.base import SearchConfig
from marco.store import Store
from marco.tasks.base import Problem
from scheduler.submit import SubmitRequest, submit


class QueueDispatcher:
    """Stands in for Redis: job ids land in a local queue that claiming threads read."""

    distributed = True

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()

    def check(self) -> None:
        return None

    def enqueue(self, jobs, priority: int = 0) -> None:  # noqa: ANN001
        for job_id, _ in jobs:
            self.q.put(job_id)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_large_submission_is_chunked_claimable_at_once_and_never_closed_early(pg_database) -> None:
    url = pg_database()
    store = Store.open(url)
    n = 10_000
    problems = [Problem("demo", "en", i, f"problem {i}: what is 6 times 7?", ("42",)) for i in range(n)]
    request = SubmitRequest(task="demo", configs=[SearchConfig(strategy="greedy")], model="scripted", chunk=4)
    dispatcher = QueueDispatcher()
    submitting = threading.Event()
    submitting.set()
    during: list[float] = []
    closed_early: list[str] = []
    progress: list[tuple[int, int]] = []

    def worker(name: str) -> None:
        while submitting.is_set():  # claim while the batch is written; the rest is left queued
            try:
                job_id = dispatcher.q.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            claim = store.claim_job(job_id, name, 60)
            took = time.perf_counter() - t0
            during.append(took)
            assert claim is not None
            store.finish_job(job_id, name)
            if submitting.is_set():
                status = store.get_batch(claim.batch_id).status
                if status not in ("queued", "running"):
                    closed_early.append(status)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    try:
        plan = submit(store, dispatcher, request, problems, progress=lambda done, total: progress.append((done, total)), rows_per_txn=1_000)
    finally:
        submit_s = time.perf_counter() - t0
        submitting.clear()
        for t in threads:
            t.join(120)
    assert len(plan.job_ids) == n // 4 and len(progress) == 10 and progress[-1] == (n, n)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert len(during) > 20, f"only {len(during)} claims while the batch was being written: not claimable at once"
    assert not closed_early, f"the batch ended while still being submitted: {closed_early[:3]}"
    p99 = sorted(during)[int(0.99 * len(during))]
    print(f"\n{n} problems submitted in {submit_s:.1f}s; {len(during)} claims during it: "
          f"median {1000 * statistics.median(during):.1f} ms, p99 {1000 * p99:.1f} ms, max {1000 * max(during):.1f} ms")
    assert p99 < 1.0, "claims stalled behind the submission"
    assert store.get_batch(plan.batch_id).status in ("queued", "running")  # open: jobs are still queued
    assert "submitting" not in store.get_batch(plan.batch_id).config  # the marker goes with the last chunk
    store.close()


def test_a_failed_chunk_leaves_nothing_behind(tmp_path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'm.db'}")

    class Failing(QueueDispatcher):
        def enqueue(self, jobs, priority: int = 0) -> None:  # noqa: ANN001
            if not self.q.empty():
                raise RuntimeError("broker went away")
            super().enqueue(jobs, priority)

    problems = [Problem("demo", "en", i, f"q {i}", ("42",)) for i in range(40)]
    request = SubmitRequest(task="demo", configs=[SearchConfig(strategy="greedy")], model="scripted", chunk=2)
    with pytest.raises(RuntimeError, match="broker went away"):
        submit(store, Failing(), request, problems, rows_per_txn=10)
    assert store.batches(10) == []
    store.close()
