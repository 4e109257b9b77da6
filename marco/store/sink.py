"""The store as a :class:`~marco.search.sink.SearchSink`: every lockstep round becomes one bulk write."""

from __future__ import annotations

import time
from typing import Sequence

from marco import metrics
from marco.search.base import SearchResult
from marco.search.tree import Node
from marco.store.heartbeat import Heartbeat, LeaseLost
from marco.store.store import Store

__all__ = ["LeaseLost", "StoreSink"]


class StoreSink:
    """Writes each round's new nodes (``INSERT ... ON CONFLICT DO NOTHING``) and changed statistics (one
    bulk UPDATE) in one transaction, and final answers as searches end.

    With ``job_id``/``worker`` it also renews the job's lease every ``lease_s / 3`` seconds in the same
    transaction, and raises :class:`LeaseLost` when the lease is gone. With a ``heartbeat`` (which renews the
    lease from its own thread) it instead checks the claim's fence in each round's transaction before the
    round's rows (cancelled, lost: :mod:`marco.store.fence`), reports progress once the round is committed,
    and then whether the worker is shutting down. ``write_s`` accumulates the time
    spent writing, which is how ``marco run`` reports the store's share of wall time.
    """

    def __init__(
        self, store: Store, job_id: str | None = None, worker: str | None = None, lease_s: float = 300.0,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.store = store
        self.job_id = job_id
        self.worker = worker
        self.lease_s = lease_s
        self.write_s = 0.0
        self.rounds = 0
        self.nodes_written = 0
        self._renewed_at = time.monotonic()

    def on_round(self, round: int, new_nodes: Sequence[Node], updated_nodes: Sequence[Node]) -> None:
        t0 = time.perf_counter()
        with self.store.sessions.begin() as s:
            if self.heartbeat is not None:
                # the claim's fence first: a share lock on the job's row, so no requeue or new claim
                # commits before this round does, and a lost claim writes nothing
                self.heartbeat.check(session=s)
            claim = self.heartbeat.token if self.heartbeat is not None else None
            self.store.write_nodes(new_nodes, updated_nodes, session=s, claim=claim)
            if self.heartbeat is None and self.job_id and self.worker and time.monotonic() - self._renewed_at > self.lease_s / 3:
                if not self.store.renew_lease(self.job_id, self.worker, self.lease_s, session=s):
                    raise LeaseLost(f"job {self.job_id} lost its lease; another worker owns it now")
                self._renewed_at = time.monotonic()
        self.rounds += 1
        self.nodes_written += len(new_nodes)
        spent = time.perf_counter() - t0
        self.write_s += spent
        metrics.NODES.inc(len(new_nodes))
        metrics.WRITE_SECONDS.observe(spent)
        if self.heartbeat is not None:
            self.heartbeat.progress()
            self.heartbeat.check_shutdown()

    def on_finish(self, results: Sequence[SearchResult]) -> None:
        t0 = time.perf_counter()
        fence = None
        if self.heartbeat is not None:
            self.heartbeat.check()  # a cancelled or lost job writes no final answers
            fence = self.heartbeat.fence  # checked again in the results' own transaction
        self.store.write_results(results, fence=fence)
        self.write_s += time.perf_counter() - t0
