"""The store as a :class:`~marco.search.sink.SearchSink`: every lockstep round becomes one bulk write."""

from __future__ import annotations

import time
from typing import Sequence

from marco.search.base import SearchResult
from marco.search.tree import Node
from marco.store.store import Store


class LeaseLost(RuntimeError):
    """Another worker took over this job (our lease expired); stop writing."""


class StoreSink:
    """Writes each round's new nodes (``INSERT ... ON CONFLICT DO NOTHING``) and changed statistics (one
    bulk UPDATE) in one transaction, and final answers as searches end.

    With ``job_id``/``worker`` it also renews the job's lease every ``lease_s / 3`` seconds in the same
    transaction, and raises :class:`LeaseLost` when the lease is gone. ``write_s`` accumulates the time
    spent writing, which is how ``marco run`` reports the store's share of wall time.
    """

    def __init__(
        self, store: Store, job_id: str | None = None, worker: str | None = None, lease_s: float = 300.0
    ) -> None:
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
            self.store.write_nodes(new_nodes, updated_nodes, session=s)
            if self.job_id and self.worker and time.monotonic() - self._renewed_at > self.lease_s / 3:
                if not self.store.renew_lease(self.job_id, self.worker, self.lease_s, session=s):
                    raise LeaseLost(f"job {self.job_id} lost its lease; another worker owns it now")
                self._renewed_at = time.monotonic()
        self.rounds += 1
        self.nodes_written += len(new_nodes)
        self.write_s += time.perf_counter() - t0

    def on_finish(self, results: Sequence[SearchResult]) -> None:
        t0 = time.perf_counter()
        self.store.write_results(results)
        self.write_s += time.perf_counter() - t0
