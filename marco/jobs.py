"""Executing one stored job: the single code path of in-process ``marco run`` and the Celery task.

``execute_job`` claims the job's lease, loads its problems and the batch's search configs from the store,
resumes every unfinished search from the nodes already stored, runs the lockstep driver with the store as
its sink, records final answers and scores, and marks the job done (or failed, with its reason). Running a
job twice (a worker died, the lease expired, the scheduler re-enqueued it) writes nothing twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from marco.llm.base import Backend
from marco.search.base import SearchConfig, SearchResult
from marco.search.driver import LockstepDriver
from marco.store.sink import LeaseLost, StoreSink
from marco.store.store import Store
from marco.tasks import get_task

log = logging.getLogger(__name__)


class BackendCache:
    """One loaded model per spec in a process (loading SmolLM2 costs seconds; a worker runs many jobs)."""

    def __init__(self, loader: Callable[[str], Backend] | None = None) -> None:
        if loader is None:
            from marco.llm import load_backend

            loader = load_backend
        self._loader = loader
        self._backends: dict[str, Backend] = {}

    def get(self, spec: str, store: "Store | None" = None) -> Backend:
        """The backend for ``spec``; ``checkpoint:ID`` resolves through ``store`` when given."""
        if spec not in self._backends:
            if store is not None and spec.startswith("checkpoint:"):
                from marco.llm import checkpoint_resolver

                with checkpoint_resolver(store.checkpoint_path):
                    self._backends[spec] = self._loader(spec)
            else:
                self._backends[spec] = self._loader(spec)
        return self._backends[spec]

    def put(self, spec: str, backend: Backend) -> None:
        """Use an already loaded ``backend`` for ``spec``."""
        self._backends[spec] = backend


@dataclass
class JobOutcome:
    """What happened to a job. ``status``: done, failed, skipped (not claimable: another worker holds it,
    or it already ended) or lost (the lease expired mid-run and another worker took over)."""

    job_id: str
    status: str
    searches: int = 0
    answered: int = 0
    correct: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    store_s: float = 0.0  # time spent writing to the store
    attempts: int = 0
    error: str | None = None


def execute_job(
    store: Store,
    job_id: str,
    backends: BackendCache,
    worker: str,
    lease_s: float = 300.0,
    on_progress: Callable[[SearchResult], None] | None = None,
) -> JobOutcome:
    """Run ``job_id`` to its end under a lease held by ``worker`` (see the module docstring)."""
    t0 = time.perf_counter()
    claim = store.claim_job(job_id, worker, lease_s)
    if claim is None:
        return JobOutcome(job_id, "skipped", error="job is held by another worker or has already ended")
    if claim.kind in JOB_RUNNERS:  # synthesis and training jobs (issue 5) have runners of their own
        return _run_other_kind(store, claim, backends, worker, lease_s, t0)
    outcome = JobOutcome(job_id, "running", attempts=claim.attempts)
    sink = StoreSink(store, job_id=job_id, worker=worker, lease_s=lease_s)
    try:
        batch = store.get_batch(claim.batch_id)
        spec = batch.config.get("model")
        if not spec:
            raise ValueError(f"batch {batch.id} names no model")
        task = get_task(batch.config.get("task") or batch.dataset or "")
        configs = {c.label: c for c in (SearchConfig.from_dict(d) for d in batch.config.get("searches", []))}
        problems = store.job_problems(job_id)
        by_key = {(str(s.problem_id), s.label): s for s in store.job_searches(job_id)}
        backend = backends.get(spec, store=store)

        for label, config in configs.items():
            malformed = [by_key[(pid, label)] for pid, p in problems if p.error and (pid, label) in by_key]
            for row in malformed:
                if row.status != "failed":
                    problem = dict(problems)[str(row.problem_id)]
                    store.mark_searches([row.id], "failed", error=problem.error)
            todo = [
                (by_key[(pid, label)].id, p)
                for pid, p in problems
                if not p.error and (pid, label) in by_key and by_key[(pid, label)].status not in ("done", "failed", "cancelled")
            ]
            outcome.searches += len(malformed)
            if not todo:
                continue
            ids = [sid for sid, _ in todo]
            stored = store.load_nodes_many(ids)
            store.mark_searches(ids, "running")
            driver = LockstepDriver(backend, task, config, sink=sink)
            results = driver.run([p for _, p in todo], search_ids=ids, resume=stored or None, on_progress=on_progress)
            outcome.searches += len(results)
            outcome.answered += sum(r.answer is not None for r in results)
            outcome.correct += sum(r.correct is True for r in results)
            outcome.tokens += sum(r.tokens for r in results)
        bad = [p for _, p in problems if p.error]
        if bad:
            # the well-formed problems are searched and kept; the job itself fails with the rows' reasons
            reason = f"{len(bad)} malformed problem row(s): " + "; ".join(f"{p.key}: {p.error}" for p in bad[:5])
            store.fail_job(job_id, reason, worker=worker)
            outcome.status, outcome.error = "failed", reason
        else:
            store.finish_job(job_id, worker=worker)
            outcome.status = "done"
    except LeaseLost as exc:
        outcome.status, outcome.error = "lost", str(exc)
    except ConnectionError as exc:
        # The model server is down (after the client's own retries): the job goes back to the queue and the
        # error goes up, so the queue retries it with backoff and it resumes from its stored nodes.
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("job %s released: %s", job_id, reason)
        store.release_job(job_id, worker, reason)
        raise
    except Exception as exc:  # the job fails with its reason; the worker goes on with the next job
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.exception("job %s failed", job_id)
        store.fail_job(job_id, reason, worker=worker)
        outcome.status, outcome.error = "failed", reason
    outcome.elapsed_s = time.perf_counter() - t0
    outcome.store_s = sink.write_s
    return outcome


# --- job kinds other than `reason` (issue 5) -------------------------------------------------------------
# kind -> "module:function"; the function takes (store, claim, backends, worker, lease_s) and returns a
# JobOutcome once the job has ended (it owns finishing or failing the job it was handed, already claimed).
JOB_RUNNERS: dict[str, str] = {
    "synthesize": "marco.synthesis.job:run_synthesis_job",
    "train": "marco.pipeline.training:run_training_job",
}


def _run_other_kind(store: Store, claim, backends: BackendCache, worker: str, lease_s: float, t0: float) -> JobOutcome:  # type: ignore[no-untyped-def]
    import importlib

    module, _, name = JOB_RUNNERS[claim.kind].partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:
        reason = f"no runner for {claim.kind} jobs ({type(exc).__name__}: {exc})".splitlines()[0]
        store.fail_job(claim.id, reason, worker=worker)
        return JobOutcome(claim.id, "failed", attempts=claim.attempts, error=reason)
    outcome: JobOutcome = fn(store, claim, backends, worker, lease_s)
    outcome.elapsed_s = time.perf_counter() - t0
    return outcome
