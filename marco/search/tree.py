"""Search trees: nodes that keep everything the store and later audits need.

Node ids are deterministic (a UUID5 of the search id, the parent id and the sibling index), so a search
that is re-run or resumed produces the same ids and a retried write can never duplicate a node.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Iterator, Literal

NodeKind = Literal["root", "step", "ministep", "rollout", "reflection", "answer"]

_NAMESPACE = uuid.UUID("7d1b7c8e-3f1a-4d5e-9a51-6b0c2f1e4a90")


def make_id(*parts: object) -> str:
    """A stable UUID string derived from ``parts``."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


@dataclass
class Node:
    """One reasoning state. ``token_ids``/``confidences`` are the tokens this node adds to its parent.

    ``value`` is the node's own evaluation (mean token confidence of the rollout that first scored it);
    ``value_sum``/``visits`` accumulate back-propagated values for UCT. ``round`` is the lockstep round
    that created it, which is what resuming a search after round ``r`` keys on.
    """

    id: str
    search_id: str
    parent_id: str | None
    depth: int
    kind: NodeKind
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    value: float | None = None
    value_sum: float = 0.0
    visits: int = 0
    terminal: bool = False
    answer: str | None = None
    round: int = 0
    index: int = 0  # sibling index under the parent
    finish_reason: str | None = None
    seq: int = 0  # creation ordinal within the search: parents always come before their children
    children: list["Node"] = field(default_factory=list, repr=False, compare=False)

    @property
    def mean_confidence(self) -> float | None:
        if not self.confidences:
            return None
        return sum(self.confidences) / len(self.confidences)

    @property
    def q(self) -> float:
        """Mean back-propagated value (0 when never visited)."""
        return self.value_sum / self.visits if self.visits else 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Tree:
    """A search tree with an id index. Nodes are appended in creation order."""

    search_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    @property
    def root(self) -> Node:
        return self.nodes[self.order[0]]

    def add(self, node: Node) -> Node:
        if node.id in self.nodes:
            return self.nodes[node.id]
        node.seq = len(self.order)
        self.nodes[node.id] = node
        self.order.append(node.id)
        if node.parent_id is not None:
            self.nodes[node.parent_id].children.append(node)
        return node

    def new_child(self, parent: Node, kind: NodeKind, **fields: object) -> Node:
        index = len(parent.children)
        node = Node(
            id=make_id(self.search_id, parent.id, index),
            search_id=self.search_id,
            parent_id=parent.id,
            depth=parent.depth + 1,
            kind=kind,
            index=index,
            **fields,  # type: ignore[arg-type]
        )
        return self.add(node)

    def path(self, node: Node) -> list[Node]:
        """Nodes from the root to ``node`` inclusive."""
        out = [node]
        while out[-1].parent_id is not None:
            out.append(self.nodes[out[-1].parent_id])
        return out[::-1]

    def path_ids(self, node: Node) -> list[int]:
        """Generated token ids along the path (the root contributes none)."""
        ids: list[int] = []
        for n in self.path(node)[1:]:
            ids.extend(n.token_ids)
        return ids

    def __iter__(self) -> Iterator[Node]:
        return (self.nodes[i] for i in self.order)

    def __len__(self) -> int:
        return len(self.order)
