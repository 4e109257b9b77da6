"""Where a running search reports its progress (the store implements this; tests record it)."""

from __future__ import annotations

from typing import Protocol, Sequence

from marco.search.base import SearchResult
from marco.search.tree import Node


class SearchSink(Protocol):
    """Receives every lockstep round's changes, so traces are persisted as the search goes.

    ``on_round`` gets, for one round, the nodes created in it and the existing nodes whose statistics
    (``visits``, ``value_sum``) changed; it is called once per round for all searches of the driver, so an
    implementation can write them in one bulk statement. ``on_finish`` gets each search when it ends.
    """

    def on_round(self, round: int, new_nodes: Sequence[Node], updated_nodes: Sequence[Node]) -> None:
        ...

    def on_finish(self, results: Sequence[SearchResult]) -> None:
        ...


class NullSink:
    """Discards everything."""

    def on_round(self, round: int, new_nodes: Sequence[Node], updated_nodes: Sequence[Node]) -> None:
        return None

    def on_finish(self, results: Sequence[SearchResult]) -> None:
        return None


class RecordingSink:
    """Keeps every call in memory (tests, benchmarks)."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, list[Node], list[Node]]] = []
        self.finished: list[SearchResult] = []

    def on_round(self, round: int, new_nodes: Sequence[Node], updated_nodes: Sequence[Node]) -> None:
        self.rounds.append((round, list(new_nodes), list(updated_nodes)))

    def on_finish(self, results: Sequence[SearchResult]) -> None:
        self.finished.extend(results)
