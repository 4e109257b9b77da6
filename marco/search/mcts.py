"""Monte-Carlo tree search as in Marco-o1.

One round of one search:

1. **Select** a leaf from the root by UCT, ``Q + c * sqrt(ln N_parent / n)`` (unvisited children first).
2. **Expand and roll out** in one generation call: k samples continue the leaf to a final answer. Each
   sample is cut into the child's action (a step or a mini-step of N tokens) and the rest of the sample,
   the rollout. Sampling the action and then its continuation from the same model is the same
   distribution as sampling the whole continuation at once, so no tokens are generated twice.
3. **Evaluate**: the child's value is the mean token confidence ``v = mean_i c_i`` over every token of
   that sample (action and rollout).
4. **Back-propagate** ``v`` to the child and all its ancestors.

With reflection, a child whose action closes the thought is cut before ``</Thought>`` and gets the
reflection sentence as its own node, from which later rounds continue.
The final answer follows the best path by value (or visits), or is a confidence-weighted vote.
"""

from __future__ import annotations

import math
from collections import defaultdict

from marco.llm.base import Generation, GenerationRequest
from marco.search.actions import THOUGHT_END, action_length, last_prefix_before
from marco.search.linear import majority
from marco.search.state import SearchState, mean_value
from marco.search.tree import Node

MIN_ROLLOUT_TOKENS = 8
MAX_RESELECT = 8


class MCTSSearch(SearchState):
    """Marco-o1's MCTS over step or mini-step actions."""

    pending: Node | None = None
    idle_plans = 0

    def children(self, node: Node) -> list[Node]:
        return [c for c in node.children if c.kind != "rollout"]

    def expandable(self, node: Node) -> bool:
        return not node.terminal and node.depth < self.config.max_depth

    def uct(self, parent: Node, child: Node) -> float:
        if child.visits == 0:
            return math.inf
        explore = self.config.exploration * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)
        return child.q + explore

    def select(self) -> Node:
        node = self.tree.root
        while True:
            kids = self.children(node)
            if not kids:
                return node
            node = max(kids, key=lambda c: (self.uct(node, c), -c.index))

    def max_new(self) -> int:
        return min(self.config.max_answer_tokens, self.budget_left // self.config.children)

    def plan(self) -> list[GenerationRequest]:
        self.pending = None
        if self.round >= self.config.max_rounds or self.max_new() < MIN_ROLLOUT_TOKENS:
            self.done = True
            return []
        for _ in range(MAX_RESELECT):
            leaf = self.select()
            if self.expandable(leaf):
                self.pending, self.idle_plans = leaf, 0
                return [self.request(leaf, self.config.children, self.max_new())]
            # a finished (or too deep) leaf: re-score it, which makes UCT look elsewhere next time
            self.backprop(leaf, leaf.value if leaf.value is not None else 0.0)
        self.idle_plans += 1
        self.done = self.idle_plans >= 4 or not any(self.expandable(n) for n in self.tree if n.kind != "rollout")
        return []

    def absorb(self, generations: list[list[Generation]]) -> None:
        leaf = self.pending
        if leaf is None:
            return
        self.round += 1
        for gen in generations[0]:
            self._expand(leaf, gen)
        self.pending = None

    def _expand(self, leaf: Node, gen: Generation) -> None:
        if not gen.token_ids:
            return
        c = self.config
        conf = self.confidences(gen)
        value = mean_value(conf) or 0.0
        ids = gen.token_ids
        k = action_length(self.backend.decode, ids, c.ministep_tokens, c.max_step_tokens)
        reflect_here = False
        if c.reflect and not self.has_reflection(leaf):
            cut = last_prefix_before(self.backend.decode, ids[:k], THOUGHT_END)
            if cut is not None and cut > 0:
                k, reflect_here = cut, True
        kind = "ministep" if c.ministep_tokens is not None else "step"
        ended = k == len(ids) and gen.finish_reason == "stop"
        child = self.add_node(leaf, kind, ids[:k], conf[:k], value=value, terminal=ended,
                              finish_reason=gen.finish_reason if k == len(ids) else None)
        if ended:
            child.answer = self.extract(self.text_of(child))
        if k < len(ids):
            rollout = self.add_node(child, "rollout", ids[k:], conf[k:], value=value,
                                    terminal=gen.finish_reason == "stop", finish_reason=gen.finish_reason)
            rollout.answer = self.extract(self.text_of(rollout))
        if reflect_here:
            self.add_reflection(child)
        self.backprop(child, value)

    # ------------------------------------------------------------------ final answer
    def answer_nodes(self) -> list[Node]:
        """Nodes holding an answer: finished ones when there are any, else truncated rollouts."""
        nodes = [n for n in self.tree if n.answer is not None and (n.terminal or n.kind == "rollout")]
        finished = [n for n in nodes if n.terminal]
        return finished or nodes

    def choose(self) -> Node | None:
        if self.config.select == "vote":
            return weighted_vote(self.answer_nodes())
        key = (lambda n: (n.q, n.visits)) if self.config.select == "value" else (lambda n: (n.visits, n.q))
        node = self.tree.root
        while True:
            kids = [k for k in self.children(node) if k.visits > 0]
            if not kids:
                break
            node = max(kids, key=key)
        if node.answer is not None:
            return node
        # an unfinished leaf: its best-valued simulation below it gives the answer
        below = [n for n in self.answer_nodes() if node.id in {p.id for p in self.tree.path(n)}]
        if below:
            return max(below, key=lambda n: n.value or 0.0)
        return weighted_vote(self.answer_nodes())


def weighted_vote(nodes: list[Node]) -> Node | None:
    """The best node of the answer with the largest summed value."""
    groups: dict[str, list[Node]] = defaultdict(list)
    for n in nodes:
        if n.answer is not None:
            groups[n.answer].append(n)
    if not groups:
        return majority(nodes)
    best = max(groups.values(), key=lambda g: sum(n.value or 0.0 for n in g))
    return max(best, key=lambda n: n.value or 0.0)
