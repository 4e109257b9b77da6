"""Helpers of the fault suite: a cuttable Postgres proxy, a scheduler thread, submitting a scripted batch,
waiting, and checking a batch against an undisturbed run."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import func, select

from marco.llm.scripted import ScriptedBackend
from marco.search.base import SearchConfig
from marco.search.driver import LockstepDriver
from marco.search.sink import RecordingSink
from marco.store import Store
from marco.store.models import Job, NodeRow
from marco.tasks import get_task
from marco.tasks.base import Problem
from scheduler.dispatch import CeleryDispatcher
from scheduler.service import Scheduler, SchedulerConfig

LEASE_S = 4
MCTS = SearchConfig(strategy="mcts", action="ministep:6", budget=400, children=2, max_rounds=10, seed=3, reflect=True)
ENDED = ("done", "failed", "cancelled")


class PgProxy:
    """A TCP proxy in front of the shared Postgres; :meth:`cut` drops every connection and refuses new ones
    (the listening socket is closed) until :meth:`restore`. Root-free, and the shared server never stops."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            socks, self._socks = list(self._socks), set()
        if listener is not None:
            listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                # accepted just before a cut: that connection must not outlive the cut (it would carry a
                # worker through the "outage")
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._socks.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def url(self, direct_url: str) -> str:
        return direct_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{self.port}/")


class SchedulerThread:
    """``Scheduler.run`` in a thread (interval 0.5 s), stoppable."""

    def __init__(self, store: Store, dispatcher: CeleryDispatcher, stale_queued_s: float = 3.0) -> None:
        self.stop_event = threading.Event()
        self.service = Scheduler(store, dispatcher, SchedulerConfig(interval_s=0.5, max_attempts=5, stale_queued_s=stale_queued_s))
        self.thread = threading.Thread(target=self.service.run, args=(self.stop_event.is_set,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)


def problems(n: int, prefix: str = "q") -> list[Problem]:
    return [Problem("mgsm", "en", i, f"{prefix} {i}: what is 40 + {i}?", ("42",)) for i in range(n)]


@dataclass
class Submitted:
    plan: object
    problems: list[Problem]
    config: SearchConfig

    @property
    def batch_id(self) -> str:
        return self.plan.batch_id  # type: ignore[attr-defined]


def submit(store: Store, dispatcher, n: int, chunk: int, model: str, config: SearchConfig = MCTS, probs=None) -> Submitted:
    probs = probs or problems(n)
    plan = store.create_batch(probs, [config], model=model, task="mgsm", chunk_size=chunk)
    dispatcher.enqueue([(j, "reason") for j in plan.job_ids])
    return Submitted(plan, probs, config)


def wait_ended(store: Store, batch_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = store.get_batch(batch_id).status
        if status in ENDED:
            return status
        time.sleep(0.3)
    raise TimeoutError(f"batch {batch_id} still {store.get_batch(batch_id).status} after {timeout_s}s: "
                       f"{store.batch_progress(batch_id).to_dict()}")


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"no {what} after {timeout_s}s")


def nodes_stored(store: Store, batch: Submitted) -> int:
    with store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(NodeRow).where(NodeRow.search_id.in_(batch.plan.search_ids))))  # type: ignore[attr-defined]


def job_on(store: Store, batch: Submitted, status: str = "running") -> Job | None:
    with store.sessions() as s:
        return s.scalars(select(Job).where(Job.batch_id == batch.batch_id, Job.status == status)).first()


def assert_batch_sound(store: Store, batch: Submitted, expect_done: bool = True) -> None:
    """Every job ended with its reason; no node stored twice; (scripted) answers equal an undisturbed run."""
    with store.sessions() as s:
        jobs = list(s.scalars(select(Job).where(Job.batch_id == batch.batch_id)))
    for job in jobs:
        assert job.status in ENDED, (job.id, job.status)
        if job.status == "failed":
            assert job.error, job.id
    ref = LockstepDriver(ScriptedBackend(), get_task("mgsm"), batch.config, RecordingSink()).run(
        batch.problems, batch.plan.search_ids  # type: ignore[attr-defined]
    )
    for r in ref:
        row = store.get_search(r.search_id)
        stored = store.load_nodes(r.search_id)
        ids = [n.id for n in stored]
        assert len(ids) == len(set(ids)), "a node id stored twice"
        if expect_done:
            assert row.status == "done", (row.status, row.error)
            assert sorted(ids) == sorted(n.id for n in r.tree), r.search_id
            assert (row.final_answer, row.final_node_id, row.tokens) == (r.answer, r.final_node_id, r.tokens)
        else:
            assert set(ids) <= {n.id for n in r.tree}, "a node the undisturbed run never made"
