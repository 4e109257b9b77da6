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

from marco import metrics
from marco.llm.base import Backend
from marco.search.base import SearchConfig, SearchResult
from marco.search.driver import LockstepDriver
from marco.store.db import is_transient
from marco.store.heartbeat import Heartbeat, JobCancelled, LeaseLost, NoProgress, ShutdownRequested
from marco.store.sink import StoreSink
from marco.store.rows import JobClaim
from marco.store.store import Store
from marco.store.urls import one_line
from marco.tasks import get_task

log = logging.getLogger(__name__)


def engine_family(spec: str, backend: Backend | None = None) -> str | None:
    """``vllm`` (a vLLM engine: in this process or a server this process started), ``transformers`` (a model
    in this process's memory) or None (a model server elsewhere, the scripted backend)."""
    if backend is not None:
        if getattr(backend, "uses_vllm_engine", False):
            return "vllm"
        return "transformers" if type(backend).__name__ == "HFBackend" else None
    if spec.startswith("vllm:"):
        return "vllm"
    if spec.startswith(("server:", "server+", "scripted")):
        return None
    return "transformers"


class BackendCache:
    """One loaded model per spec in a process (loading SmolLM2 costs seconds; a worker runs many jobs).

    Memory guard: a vLLM engine (which takes its whole KV space up front) and a transformers model never
    stay loaded together. Loading one closes and forgets the backends of the other family (and a second
    vLLM engine replaces the first); a later job that needs one loads it again.
    """

    def __init__(self, loader: Callable[[str], Backend] | None = None) -> None:
        if loader is None:
            from marco.llm import load_backend

            loader = load_backend
        self._loader = loader
        self._backends: dict[str, Backend] = {}

    def _make_room(self, family: str | None, keep: str) -> None:
        if family is None:
            return
        for spec, backend in list(self._backends.items()):
            other = engine_family(spec, backend)
            if spec != keep and other is not None and (other != family or family == "vllm"):
                log.info("unloading %s (%s) before a %s model loads", spec, other, family)
                del self._backends[spec]
                close = getattr(backend, "close", None)
                if callable(close):
                    close()

    def get(self, spec: str, store: "Store | None" = None) -> Backend:
        """The backend for ``spec``; ``checkpoint:ID`` resolves through ``store`` when given."""
        if spec not in self._backends:
            started = time.perf_counter()
            self._make_room(engine_family(spec), spec)
            backend = self._load(spec, store)
            self._make_room(engine_family(spec, backend), spec)  # a routed spec may load another kind
            self._backends[spec] = backend
            metrics.MODEL_LOAD_SECONDS.labels(spec).set(time.perf_counter() - started)
            metrics.MODELS_LOADED.inc()
        return self._backends[spec]

    def _load(self, spec: str, store: "Store | None") -> Backend:
        if store is not None and spec.startswith("checkpoint:"):
            from marco.llm import checkpoint_resolver

            with checkpoint_resolver(store.checkpoint_path):
                return self._loader(spec)
        return self._loader(spec)

    def close(self) -> None:
        """Close every backend that can be closed (vLLM engines and the servers they started)."""
        for backend in self._backends.values():
            close = getattr(backend, "close", None)
            if callable(close):
                close()
        self._backends.clear()

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
    token: int | None = None,
    on_claim: Callable[[JobClaim], None] | None = None,
    progress_timeout_s: float | None = None,
) -> JobOutcome:
    """Run ``job_id`` to its end under a lease held by ``worker`` (see the module docstring).

    A heartbeat thread renews the lease from the claim on, model loading included. A transient database
    error (connection lost) is raised, not recorded: the job keeps its lease, the caller retries with
    ``reclaim=True`` and the job resumes from its stored nodes; should the retries run out, the lease
    expires and the scheduler re-enqueues it. Every other error fails the job with its reason.

    ``token``: with ``reclaim``, the fencing token of this worker's earlier claim (only that claim is taken
    back, never another process's under the same name); ``on_claim`` is told every new claim (the worker
    keeps its token for such a retry). ``progress_timeout_s``: a job with no round written for that long is
    ended by its heartbeat (see :class:`marco.store.heartbeat.Heartbeat`). Every write the job makes is
    fenced by its claim's token (:mod:`marco.store.fence`).
    """
    t0 = time.perf_counter()
    claim = store.claim_job(job_id, worker, lease_s, reclaim=reclaim, token=token)
    metrics.CLAIM_SECONDS.observe(time.perf_counter() - t0)
    if claim is None:
        metrics.JOBS.labels("unknown", "skipped").inc()
        return JobOutcome(job_id, "skipped", error="job is held by another worker or has already ended")
    if on_claim is not None:
        on_claim(claim)
    outcome = _execute_claimed(store, claim, backends, worker, lease_s, on_progress, t0, progress_timeout_s)
    metrics.JOBS.labels(claim.kind, outcome.status).inc()
    metrics.JOB_SECONDS.labels(claim.kind).observe(time.perf_counter() - t0)
    return outcome


def _execute_claimed(
    store: Store,
    claim: JobClaim,
    backends: BackendCache,
    worker: str,
    lease_s: float,
    on_progress: Callable[[SearchResult], None] | None,
    t0: float,
    progress_timeout_s: float | None,
) -> JobOutcome:
    job_id = claim.id
    fence = claim.fence
    with Heartbeat(store, job_id, worker, lease_s, token=claim.token, progress_timeout_s=progress_timeout_s) as heartbeat:
        if claim.kind in JOB_RUNNERS:  # synthesis and training jobs (issue 5) have runners of their own
            return _run_other_kind(store, claim, backends, worker, lease_s, t0, heartbeat)
        outcome = JobOutcome(job_id, "running", attempts=claim.attempts)
        sink = StoreSink(store, job_id=job_id, worker=worker, lease_s=lease_s, heartbeat=heartbeat)
        try:
            _run_reason_job(store, claim, backends, sink, heartbeat, outcome, on_progress)
        except JobCancelled as exc:
            outcome.status, outcome.error = "cancelled", str(exc)
        except NoProgress as exc:  # the heartbeat failed the job with its reason
            outcome.status, outcome.error = "failed", str(exc)
        except LeaseLost as exc:
            heartbeat.note_lost()
            outcome.status, outcome.error = "lost", str(exc)
        except ShutdownRequested as exc:
            store.release_job(job_id, worker, token=fence.token)  # another worker resumes it from the stored rounds
            outcome.status, outcome.error = "released", str(exc)
        except ConnectionError as exc:
            # The model server is down (after the client's own retries): the job goes back to the queue with
            # the reason and the error goes up, so the queue retries it with backoff and it resumes from its
            # stored nodes.
            reason = f"{type(exc).__name__}: {one_line(exc)}"
            log.warning("job %s released: %s", job_id, reason)
            store.release_job(job_id, worker, reason, token=fence.token)
            raise
        except Exception as exc:
            if is_transient(exc):
                raise  # the database went away: retry (the store never saw this job end)
            reason = f"{type(exc).__name__}: {one_line(exc)}"
            log.exception("job %s failed", job_id)
            store.fail_job(job_id, reason, worker=worker, token=fence.token)
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
    heartbeat.progress()  # a model load is progress (it may take minutes)
    heartbeat.check()
    fence = heartbeat.fence
    # a problem the model cannot read (malformed row, oversized question) fails only its own searches
    errors = {pid: p.error or _oversized(backend, p.question) for pid, p in problems}

    for label, config in configs.items():
        bad_rows = [by_key[(pid, label)] for pid, _ in problems if errors[pid] and (pid, label) in by_key]
        for row in bad_rows:
            if row.status != "failed":
                store.mark_searches([row.id], "failed", error=errors[str(row.problem_id)], fence=fence)
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
        store.mark_searches(ids, "running", fence=fence)
        driver = LockstepDriver(backend, task, config, sink=sink)
        results = driver.run([p for _, p in todo], search_ids=ids, resume=stored or None, on_progress=on_progress)
        outcome.searches += len(results)
        outcome.answered += sum(r.answer is not None for r in results)
        outcome.correct += sum(r.correct is True for r in results)
        outcome.tokens += sum(r.tokens for r in results)
        metrics.TOKENS.inc(sum(r.tokens for r in results))
        for r in results:
            metrics.SEARCHES.labels("failed" if r.error else "done").inc()
    heartbeat.check()
    bad = [(p, errors[pid]) for pid, p in problems if errors[pid]]
    metrics.PROBLEMS.labels("failed").inc(len(bad))
    metrics.PROBLEMS.labels("done").inc(len(problems) - len(bad))
    if bad:
        # the well-formed problems are searched and kept; the job itself fails with the rows' reasons
        reason = f"{len(bad)} problem(s) could not be searched: " + "; ".join(f"{p.key}: {e}" for p, e in bad[:5])
        if not store.fail_job(job_id, reason, worker=worker, token=claim.token):
            raise LeaseLost(f"job {job_id}: claim {claim.token} no longer holds the job; its end not written")
        outcome.status, outcome.error = "failed", reason
    elif store.finish_job(job_id, worker=worker, token=claim.token):
        outcome.status = "done"
    else:  # cancelled or taken over between the last round and now
        state = store.job_state(job_id)
        if state and state[0] == "cancelled":
            outcome.status = "cancelled"
        else:
            raise LeaseLost(f"job {job_id}: claim {claim.token} no longer holds the job; its end not written")


# --- job kinds other than `reason` (issue 5) -------------------------------------------------------------
# kind -> "module:function"; the function takes (store, claim, backends, worker, lease_s, heartbeat) and
# returns a JobOutcome once the job has ended (it owns finishing or failing the job it was handed, already
# claimed, under ``claim.fence``; ``heartbeat`` renews the lease and can interrupt it on a loss).
JOB_RUNNERS: dict[str, str] = {
    "synthesize": "marco.synthesis.job:run_synthesis_job",
    "train": "marco.pipeline.training:run_training_job",
}


def run_under_claim(
    store: Store,
    claim,  # type: ignore[no-untyped-def]
    worker: str,
    lease_s: float,
    heartbeat: Heartbeat | None,
    body: Callable[[Callable[[], None]], int],
    label: str,
    on_failure: Callable[[str], None] | None = None,
    progress_timeout: bool = True,
) -> JobOutcome:
    """Run a long job's ``body(check)`` under its claim and map how it ended to a :class:`JobOutcome`: done
    (and the job finished under the claim's fencing token), cancelled, no progress, lost lease or failed
    (``on_failure(reason)`` records it on the job's own rows first; the job keeps the reason either way).
    ``check`` marks progress and raises once the lease is lost; the heartbeat also interrupts ``body``
    within one renewal period. ``body`` returns the searches it covered. ``progress_timeout=False``: one long
    step with no progress to report (the lease and the fence still hold it)."""
    outcome = JobOutcome(claim.id, "running", attempts=claim.attempts)
    own = heartbeat is None
    beat = heartbeat or Heartbeat(store, claim.id, worker, lease_s, token=claim.token)
    if not progress_timeout:
        beat.progress_timeout_s = None

    def check() -> None:
        beat.progress()
        beat.check()

    try:
        if own:
            beat.__enter__()
        with beat.interrupting():
            searches = body(check)
            if not store.finish_job(claim.id, worker=worker, token=claim.token):
                raise LeaseLost(f"job {claim.id}: claim {claim.token} no longer holds the job")
        outcome.status, outcome.searches = "done", searches
    except JobCancelled as exc:
        outcome.status, outcome.error = "cancelled", str(exc)
    except NoProgress as exc:
        outcome.status, outcome.error = "failed", str(exc)
    except LeaseLost as exc:
        beat.note_lost()
        outcome.status, outcome.error = "lost", f"job {claim.id} lost its lease; another worker owns it now ({exc})"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {one_line(exc)}"
        log.exception("%s job %s failed", label, claim.id)
        if on_failure is not None:
            try:
                on_failure(reason)
            except Exception:  # its rows may not exist yet (bad payload)
                log.warning("%s job %s: could not record the failure on its rows", label, claim.id)
        store.fail_job(claim.id, reason, worker=worker, token=claim.token)
        outcome.status, outcome.error = "failed", reason
    finally:
        if own:
            beat.__exit__(None, None, None)
    return outcome


def _run_other_kind(store: Store, claim, backends: BackendCache, worker: str, lease_s: float, t0: float,  # type: ignore[no-untyped-def]
                    heartbeat: Heartbeat) -> JobOutcome:
    import importlib

    module, _, name = JOB_RUNNERS[claim.kind].partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as exc:
        reason = f"no runner for {claim.kind} jobs ({type(exc).__name__}: {one_line(exc)})"
        store.fail_job(claim.id, reason, worker=worker, token=claim.token)
        return JobOutcome(claim.id, "failed", attempts=claim.attempts, error=reason)
    outcome: JobOutcome = fn(store, claim, backends, worker, lease_s, heartbeat)
    outcome.elapsed_s = time.perf_counter() - t0
    return outcome
