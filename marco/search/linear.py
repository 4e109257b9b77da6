"""Sampling baselines: greedy chain-of-thought, self-consistency and best-of-N by confidence.

Equal spend: self-consistency and best-of-N draw independent chains from the root in **waves** (one
batched request per wave) until the budget left cannot pay for another chain; ``n`` caps the number of
chains (0: as many as the budget pays). How a wave is sized, all from the tree (so a resumed search plans
the same waves):

- a chain may write up to ``max_answer_tokens`` (twice that with reflection), never less than that
  because of its wave mates: a wave has ``min(chains still allowed, max(1, budget_left // chain cap))``
  chains, each allowed ``min(chain cap, budget_left // wave size)`` tokens, so a wave never overspends;
- the next wave starts only when the budget left is at least the mean length of the chains finished so
  far (a "typical" chain); otherwise the search ends.

Greedy is one chain at temperature 0. With reflection, a chain stops when it closes its thought, gets the
reflection sentence appended, and continues to its answer in the next round (sharing what is left of the
budget with the other open chains) before the next wave starts. The final answer follows the rule of
every strategy: finished chains (ended by the model, with an answer in an ``<Output>``) before chains cut
by a length limit or ended (EOS) without an ``<Output>``.
"""

from __future__ import annotations

import math
from collections import defaultdict

from marco.llm.base import Generation, GenerationRequest
from marco.search.actions import THOUGHT_END, last_prefix_before
from marco.search.state import SearchState, mean_value
from marco.search.tree import Node


class LinearSearch(SearchState):
    """Chains from the root, drawn in waves; subclasses choose the final answer."""

    @property
    def greedy(self) -> bool:
        return self.config.strategy == "greedy"

    @property
    def cap(self) -> float:
        """Most chains this search may draw."""
        if self.greedy:
            return 1
        return self.config.n or math.inf

    @property
    def chain_cap(self) -> int:
        """Most tokens one chain may write."""
        return self.config.max_answer_tokens * (2 if self.config.reflect else 1)

    def chain_tokens(self, node: Node) -> int:
        path = self.tree.path(node)
        own = sum(n.num_tokens for n in path if n.kind not in ("root", "reflection"))
        return own + sum(c.num_tokens for n in path for c in n.children if c.kind == "rollout")

    def open_leaves(self) -> list[Node]:
        return [n for n in self.tree if n.kind == "reflection" and not n.children]

    def continuations(self) -> list[tuple[Node, int]]:
        """Open chains (after a reflection) that can go on, with the tokens each may still write: what is
        left of its chain cap, and an equal share of the budget left among them."""
        live = [(leaf, self.chain_cap - self.chain_tokens(leaf)) for leaf in self.open_leaves()]
        live = [(leaf, left) for leaf, left in live if left > 0]
        if not live:
            return []
        share = self.budget_left // len(live)
        return [(leaf, min(left, share)) for leaf, left in live if min(left, share) > 0]

    def typical_chain(self) -> float | None:
        """Mean length of the chains that ended so far (None before the first one)."""
        lengths = [self.chain_tokens(a) for a in self.answers()]
        return sum(lengths) / len(lengths) if lengths else None

    def next_wave(self) -> tuple[int, int] | None:
        """(chains, tokens per chain) of the next wave, or None when the budget cannot pay for a chain."""
        drawn = len(self.tree.root.children)
        left = self.budget_left
        typical = self.typical_chain()
        if drawn >= self.cap or left <= 0 or (typical is not None and left < typical):
            return None
        width = int(min(self.cap - drawn, max(1, left // self.chain_cap)))
        per_chain = min(self.chain_cap, left // width)
        return (width, per_chain) if per_chain > 0 else None

    def plan(self) -> list[GenerationRequest]:
        conts = self.continuations()
        if conts:
            return [self.request(leaf, 1, left, greedy=self.greedy) for leaf, left in conts]
        wave = self.next_wave()
        if wave is None:
            self.done = True
            return []
        width, per_chain = wave
        stop = (THOUGHT_END,) if self.config.reflect else ()
        return [self.request(self.tree.root, width, per_chain, greedy=self.greedy, stop=stop)]

    def absorb(self, generations: list[list[Generation]]) -> None:
        conts = self.continuations()  # the tree has not changed since plan(): the same list
        self.round += 1
        if conts:
            for (leaf, _), gens in zip(conts, generations):
                self._finish_chain(leaf, gens[0])
            return
        for gen in generations[0]:
            self._absorb_first(self.tree.root, gen)

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
        answers = self.prefer_finished(self.answers())
        return max(answers, key=lambda n: n.value or 0.0) if answers else None


class SelfConsistency(LinearSearch):
    def choose(self) -> Node | None:
        return majority(self.prefer_finished(self.answers()))


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
