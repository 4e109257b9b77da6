"""Sampling baselines: greedy chain-of-thought, self-consistency@N and best-of-N by confidence.

Each is N independent chains from the root (N=1, temperature 0 for greedy) sharing the token budget
equally, so baselines are compared with a search at the same cost. With reflection, a chain stops when it
closes its thought, gets the reflection sentence appended, and continues to its answer in the next round.
"""

from __future__ import annotations

from collections import defaultdict

from marco.llm.base import Generation, GenerationRequest
from marco.search.actions import THOUGHT_END, last_prefix_before
from marco.search.state import SearchState, mean_value
from marco.search.tree import Node


class LinearSearch(SearchState):
    """N chains; subclasses choose the final answer."""

    @property
    def width(self) -> int:
        return 1 if self.config.strategy == "greedy" else self.config.n

    @property
    def greedy(self) -> bool:
        return self.config.strategy == "greedy"

    @property
    def chain_budget(self) -> int:
        return min(self.config.max_answer_tokens * (2 if self.config.reflect else 1), self.config.budget // self.width)

    def chain_tokens(self, node: Node) -> int:
        path = self.tree.path(node)
        own = sum(n.num_tokens for n in path if n.kind not in ("root", "reflection"))
        return own + sum(c.num_tokens for n in path for c in n.children if c.kind == "rollout")

    def open_leaves(self) -> list[Node]:
        return [n for n in self.tree if n.kind == "reflection" and not n.children]

    def plan(self) -> list[GenerationRequest]:
        root = self.tree.root
        if not root.children:
            stop = (THOUGHT_END,) if self.config.reflect else ()
            return [self.request(root, self.width, self.chain_budget, greedy=self.greedy, stop=stop)]
        reqs = []
        for leaf in self.open_leaves():
            left = self.chain_budget - self.chain_tokens(leaf)
            if left > 0:
                reqs.append(self.request(leaf, 1, left, greedy=self.greedy))
        if not reqs:
            self.done = True
        return reqs

    def absorb(self, generations: list[list[Generation]]) -> None:
        self.round += 1
        root = self.tree.root
        if not root.children:
            for gen in generations[0]:
                self._absorb_first(root, gen)
        else:
            leaves = [n for n in self.open_leaves() if self.chain_budget - self.chain_tokens(n) > 0]
            for leaf, gens in zip(leaves, generations):
                self._finish_chain(leaf, gens[0])
        if not self.open_leaves():
            self.done = True

    def _absorb_first(self, root: Node, gen: Generation) -> None:
        conf = self.confidences(gen)
        cut = last_prefix_before(self.backend.decode, gen.token_ids, THOUGHT_END) if self.config.reflect else None
        if cut is None or cut == 0:
            self._answer_node(root, gen.token_ids, conf, gen.finish_reason, conf)
            return
        step = self.add_node(root, "step", gen.token_ids[:cut], conf[:cut], value=mean_value(conf),
                             finish_reason=gen.finish_reason)
        # the model's own closing of the thought, replaced by the reflection: kept for the record
        self.add_node(step, "rollout", gen.token_ids[cut:], conf[cut:], value=mean_value(conf[cut:]),
                      terminal=False)
        self.add_reflection(step)

    def _finish_chain(self, leaf: Node, gen: Generation) -> None:
        conf = self.confidences(gen)
        before = [c for n in self.tree.path(leaf) for c in n.confidences]
        self._answer_node(leaf, gen.token_ids, conf, gen.finish_reason, before + conf)

    def _answer_node(self, parent: Node, ids: list[int], conf: list[float], finish: str, chain_conf: list[float]) -> None:
        value = mean_value(chain_conf)
        node = self.add_node(parent, "answer", ids, conf, value=value, terminal=finish == "stop",
                             finish_reason=finish)
        node.answer = self.extract(self.text_of(node))
        if value is not None:
            self.backprop(node, value)

    def answers(self) -> list[Node]:
        return [n for n in self.tree if n.kind == "answer"]


class GreedySearch(LinearSearch):
    def choose(self) -> Node | None:
        answers = self.answers()
        return answers[0] if answers else None


class BestOfN(LinearSearch):
    def choose(self) -> Node | None:
        answers = self.answers()
        return max(answers, key=lambda n: n.value or 0.0) if answers else None


class SelfConsistency(LinearSearch):
    def choose(self) -> Node | None:
        return majority(self.answers())


def majority(nodes: list[Node]) -> Node | None:
    """The best node of the most frequent answer (ties broken by summed value)."""
    groups: dict[str, list[Node]] = defaultdict(list)
    for n in nodes:
        if n.answer is not None:
            groups[n.answer].append(n)
    if not groups:
        return max(nodes, key=lambda n: n.value or 0.0) if nodes else None
    best = max(groups.values(), key=lambda g: (len(g), sum(n.value or 0.0 for n in g)))
    return max(best, key=lambda n: n.value or 0.0)
