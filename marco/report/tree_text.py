"""A search tree as indented text lines (what ``marco traces show`` prints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from marco.search.tree import Node


@dataclass(frozen=True)
class TreeLine:
    node: Node
    text: str
    chosen: bool


def excerpt(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def tree_lines(nodes: Sequence[Node], chosen_path: Sequence[str] = (), width: int = 60) -> list[TreeLine]:
    """Depth-first, children in sibling order; ``chosen`` marks the nodes of the chosen path."""
    children: dict[str | None, list[Node]] = {}
    for n in sorted(nodes, key=lambda n: n.seq):
        children.setdefault(n.parent_id, []).append(n)
    ids = {n.id for n in nodes}
    roots = [n for n in nodes if n.parent_id is None or n.parent_id not in ids]
    chosen = set(chosen_path)
    out: list[TreeLine] = []

    def walk(node: Node, indent: int) -> None:
        mark = "*" if node.id in chosen else " "
        answer = f" answer={node.answer}" if node.answer is not None else ""
        line = (
            f"{mark} {'  ' * indent}{node.kind} conf={_num(node.mean_confidence)} value={_num(node.value)} "
            f"visits={node.visits}{answer} {excerpt(node.text, width)!r} [{node.id}]"
        )
        out.append(TreeLine(node, line, node.id in chosen))
        for child in sorted(children.get(node.id, []), key=lambda c: c.index):
            walk(child, indent + 1)

    for root in sorted(roots, key=lambda n: n.seq):
        walk(root, 0)
    return out
