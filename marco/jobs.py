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
from marco.store.db import is_transient
from marco.store.heartbeat import Heartbeat, JobCancelled, LeaseLost, ShutdownRequested
from marco.store.sink import StoreSink
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
    """What happened to a job. ``status``: done, failed, cancelled (its batch was cancelled mid-run), skipped
    (not claimable: another worker holds it, or it already ended), lost (the lease expired mid-run and
    another worker took over) or released (the worker shut down and handed the job back to the queue)."""

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
    reclaim: bool = False,
) -> JobOutcome:
    """Run ``job_id`` to its end under a lease held by ``worker`` (see the module docstring).

    A heartbeat thread renews the lease from the claim on, model loading included. A transient database
    error (connection lost) is raised, not recorded: the job keeps its lease, the caller retries with
    ``reclaim=True`` and the job resumes from its stored nodes; should the retries run out, the lease
    expires and the scheduler re-enqueues it. Every other error fails the job with its reason.
    """
    t0 = time.perf_counter()
    claim = store.claim_job(job_id, worker, lease_s, reclaim=reclaim)
    if claim is None:
        return JobOutcome(job_id, "skipped", error="job is held by another worker or has already ended")
    with Heartbeat(store, job_id, worker, lease_s) as heartbeat:
        if claim.kind in JOB_RUNNERS:  # synthesis and training jobs (issue 5) have runners of their own
            return _run_other_kind(store, claim, backends, worker, lease_s, t0)
        outcome = JobOutcome(job_id, "running", attempts=claim.attempts)
        sink = StoreSink(store, job_id=job_id, worker=worker, lease_s=lease_s, heartbeat=heartbeat)
        try:
            _run_reason_job(store, claim, backends, sink, heartbeat, outcome, on_progress)
        except JobCancelled as exc:
            outcome.status, outcome.error = "cancelled", str(exc)
        except LeaseLost as exc:
            heartbeat.note_lost()
            outcome.status, outcome.error = "lost", str(exc)
        except ShutdownRequested as exc:
            store.release_job(job_id, worker)  # another worker resumes it from the rounds stored so far
            outcome.status, outcome.error = "released", str(exc)
        except Exception as exc:
            if is_transient(exc):
                raise  # the database went away: retry (the store never saw this job end)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.exception("job %s failed", job_id)
            store.fail_job(job_id, reason, worker=worker)
            outcome.status, outcome.error = "failed", reason
    outcome.elapsed_s = time.perf_counter() - t0
    outcome.store_s = sink.write_s
    return outcome


MAX_QUESTION_CHARS = 100_000  # a question longer than this fails its own searches, unread by the model


def _oversized(backend: Backend, question: str) -> str | None:
    """Why ``question`` cannot be searched by ``backend`` (None when it fits)."""
    if len(question) > MAX_QUESTION_CHARS:
        return f"question is {len(question):,} characters, over the limit of {MAX_QUESTION_CHARS:,}"
    context = getattr(backend, "max_context", None)
    if context:
        n = len(backend.encode(question))
        if n >= context:
            return f"question is {n:,} tokens, longer than the model's context of {context:,} tokens"
    return None


def _run_reason_job(
    store: Store,
    claim,  # type: ignore[no-untyped-def]
    backends: BackendCache,
    sink: StoreSink,
    heartbeat: Heartbeat,
    outcome: JobOutcome,
    on_progress: Callable[[SearchResult], None] | None,
) -> None:
    job_id, worker = claim.id, sink.worker
    batch = store.get_batch(claim.batch_id)
    spec = batch.config.get("model")
    if not spec:
        raise ValueError(f"batch {batch.id} names no model")
    task = get_task(batch.config.get("task") or batch.dataset or "")
    configs = {c.label: c for c in (SearchConfig.from_dict(d) for d in batch.config.get("searches", []))}
    problems = store.job_problems(job_id)
    by_key = {(str(s.problem_id), s.label): s for s in store.job_searches(job_id)}
    backend = backends.get(spec, store=store)
    heartbeat.check()
    # a problem the model cannot read (malformed row, oversized question) fails only its own searches
    errors = {pid: p.error or _oversized(backend, p.question) for pid, p in problems}

    for label, config in configs.items():
        bad_rows = [by_key[(pid, label)] for pid, _ in problems if errors[pid] and (pid, label) in by_key]
        for row in bad_rows:
            if row.status != "failed":
                store.mark_searches([row.id], "failed", error=errors[str(row.problem_id)])
        todo = [
            (by_key[(pid, label)].id, p)
            for pid, p in problems
            if not errors[pid] and (pid, label) in by_key and by_key[(pid, label)].status not in ("done", "failed", "cancelled")
        ]
        outcome.searches += len(bad_rows)
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
    heartbeat.check()
    bad = [(p, errors[pid]) for pid, p in problems if errors[pid]]
    if bad:
        # the well-formed problems are searched and kept; the job itself fails with the rows' reasons
        reason = f"{len(bad)} problem(s) could not be searched: " + "; ".join(f"{p.key}: {e}" for p, e in bad[:5])
        store.fail_job(job_id, reason, worker=worker)
        outcome.status, outcome.error = "failed", reason
    elif store.finish_job(job_id, worker=worker):
        outcome.status = "done"
    else:  # cancelled or taken over between the last round and now
        state = store.job_state(job_id)
        outcome.status = "cancelled" if state and state[0] == "cancelled" else "lost"


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
