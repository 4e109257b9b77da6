"""Monte-Carlo tree search as in Marco-o1.

One round of one search:

1. **Select** a leaf from the root by UCT, ``Q + c * sqrt(ln N_parent / n)`` (unvisited children first;
   with ``normalize``, Q is rescaled to [0, 1] among the siblings first).
2. **Expand and roll out** in one generation call: k samples continue the leaf to a final answer. Each
   sample is cut into the child's action (a step or a mini-step of N tokens) and the rest of the sample,
   the rollout, stored under the child. Sampling the action and then its continuation from the same
   model is the same distribution as sampling the whole continuation at once. With ``merge`` (default),
   a sample whose action is the same tokens as a sibling's is no new child: it is one more simulation
   through that sibling (its visits and value sum add up), and the rest of the sample is kept as an extra
   rollout under it, finish reason ``merged`` (empty when the sample was only the action). Its tokens
   count as spent, the repeated action's included (:meth:`SearchState.merged_tokens`); such rollouts are
   not reused.
3. **Rollout reuse** (``reuse``): a leaf's stored rollout is already a sample from that leaf, so when the
   leaf is expanded the rollout supplies the first of its k children (its first action, and the rest as
   that child's rollout) with no generation; only k - 1 samples are requested. Those nodes carry the
   finish reason ``reused`` and are not counted again: no token is generated twice, and the tree grows
   deeper for the same tokens. The reused child inherits the simulation that ran through it (1 visit,
   that simulation's value), which its ancestors have counted already.
4. **Evaluate**: a sample's value is the mean token confidence ``v = mean_i c_i`` over every token of the
   sample; a sample with no ``<Output>``, cut by the token limit or ended by the model (EOS) without one,
   gets ``max(0, v - cut_penalty)``.
5. **Back-propagate** ``v`` to the child and all its ancestors.

Stopping: a typical sample is the mean length of the samples so far; the search stops expanding when the
budget left cannot pay for the samples an expansion needs (k, or k - 1 with reuse) of that length.
Rollouts are never shrunk below that. The first expansion, with no typical length yet, gives each sample
a whole chain's length (``max_answer_tokens``, as best-of-N's first chain gets) and draws as many of its k
samples as the budget pays at that length (at least one), so it never overspends and a long chain is not
cut before it answers. With ``fill`` the
last expansion takes as many samples as the budget pays instead (at least one of typical length), and with
``widen`` a tree whose selections all reach finished leaves grows new chains from the root; both make MCTS
spend its budget as the sc/bon waves do.

With reflection, a sample that closes the thought is cut before ``</Thought>`` and the reflection sentence
becomes a node of its own, from which later rounds continue, once per path: when the action closes the
thought, under the child; when the rollout does (``reflect_rollouts``), the rollout's part inside the
thought becomes a ``step`` node under the child, with the reflection under it.

The final answer prefers finished nodes (ended by the model, with an answer in an ``<Output>``) over ones
cut by a length limit or ended without an ``<Output>``. ``select``: ``value`` follows the child of best
mean Q from the root, among children with such answers below them, then takes the best answer below;
``visits`` follows the most visited child (ties: mean Q), ``robust`` the most visited child with ties
broken by the best answer value below it (a lucky single sample cannot outrank an expanded child whose
samples agree), ``max-value`` takes the best-valued answer of the whole tree; ``vote`` is a value-weighted
majority of the answers. The value of an answer in the final pick is ``final_value``: its sample's value (``node``) or the
mean confidence of every generated token from the root to it (``path``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

from marco.llm.base import Generation, GenerationRequest
from marco.prompts import output_text, thought_closed
from marco.search.actions import THOUGHT_END, action_length, last_prefix_before
from marco.search.linear import majority
from marco.search.state import MERGED, REUSED, SearchState, mean_value
from marco.search.tree import Node

MAX_RESELECT = 8


class MCTSSearch(SearchState):
    """Marco-o1's MCTS over step or mini-step actions."""

    pending: Node | None = None
    idle_plans = 0

    def children(self, node: Node) -> list[Node]:
        return [c for c in node.children if c.kind != "rollout"]

    def expandable(self, node: Node) -> bool:
        return not node.terminal and node.depth < self.config.max_depth

    # ------------------------------------------------------------------ selection
    def uct(self, parent: Node, child: Node, q: float | None = None) -> float:
        if child.visits == 0:
            return math.inf
        explore = self.config.exploration * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)
        return (child.q if q is None else q) + explore

    def sibling_q(self, kids: Sequence[Node]) -> dict[str, float]:
        """Q of each visited child, rescaled to [0, 1] among its siblings when ``normalize`` is on."""
        qs = {k.id: k.q for k in kids if k.visits > 0}
        if not self.config.normalize or not qs:
            return qs
        lo, hi = min(qs.values()), max(qs.values())
        return {i: (q - lo) / (hi - lo) if hi > lo else 0.5 for i, q in qs.items()}

    def select(self) -> Node:
        node = self.tree.root
        while True:
            kids = self.children(node)
            if not kids:
                return node
            qs = self.sibling_q(kids)
            parent = node
            node = max(kids, key=lambda c: (self.uct(parent, c, qs.get(c.id)), -c.index))

    # ------------------------------------------------------------------ budget
    def stored_rollout(self, leaf: Node) -> Node | None:
        """The rollout a leaf's expansion can reuse (none once the leaf has children of its own)."""
        if not self.config.reuse or self.children(leaf):
            return None
        return next((c for c in leaf.children if c.kind == "rollout" and c.token_ids and c.finish_reason != MERGED),
                    None)

    def samples(self) -> int:
        """Samples generated so far: fresh action nodes (made in a later round than their parent) and
        samples merged into an identical sibling."""
        return sum(
            1 for n in self.tree
            if n.finish_reason == MERGED or (
                n.kind in ("step", "ministep") and n.finish_reason != REUSED
                and self.tree.nodes[n.parent_id].round < n.round)  # type: ignore[index]
        )

    def typical_sample(self) -> float | None:
        """Mean length of the samples so far (None before the first expansion)."""
        count = self.samples()
        return self.tokens_spent / count if count else None

    def plan(self) -> list[GenerationRequest]:
        self.pending = None
        c = self.config
        for _ in range(MAX_RESELECT):
            if self.round >= c.max_rounds:
                self.done = True
                return []
            leaf = self.select()
            if not self.expandable(leaf):
                # a finished (or too deep) leaf: re-score it, which makes UCT look elsewhere next time
                self.backprop(leaf, leaf.value if leaf.value is not None else 0.0)
                continue
            need = c.children - (1 if self.stored_rollout(leaf) is not None else 0)
            if need == 0:  # k = 1 with reuse: the stored rollout is the whole expansion
                self.round += 1
                self._reuse(leaf)
                continue
            return self._expansion(leaf, need)
        if c.widen and self.expandable(self.tree.root):
            # every selection reached a finished leaf: new whole chains from the root, while the budget pays
            return self._expansion(self.tree.root, c.children)
        self.idle_plans += 1
        self.done = self.idle_plans >= 4 or not any(self.expandable(n) for n in self.tree if n.kind != "rollout")
        return []

    def _expansion(self, leaf: Node, need: int) -> list[GenerationRequest]:
        """The request expanding ``leaf`` with ``need`` samples, or none (and done) when the budget left
        cannot pay for them at the typical sample length (with ``fill``: for even one of them)."""
        c = self.config
        typical = self.typical_sample()
        left = self.budget_left
        if typical is None:
            # the first expansion: each sample may write a whole chain, as best-of-N's first wave does; as
            # many of the ``need`` samples as the budget pays at that length (at least one, and never more
            # than the budget in all)
            need = min(need, max(1, left // c.max_answer_tokens))
        elif left < need * typical and c.fill:
            need = int(left // typical)  # the last expansion: as many samples as the budget pays
        if need < 1 or (typical is not None and left < need * typical) or left // need < 1:
            self.done = True
            return []
        self.pending, self.idle_plans = leaf, 0
        return [self.request(leaf, need, min(c.max_answer_tokens, left // need))]

    def absorb(self, generations: list[list[Generation]]) -> None:
        leaf = self.pending
        if leaf is None:
            return
        self.round += 1
        if self.stored_rollout(leaf) is not None:
            self._reuse(leaf)
        for gen in generations[0]:
            self._expand(leaf, gen)
        self.pending = None

    # ------------------------------------------------------------------ expansion
    def sample_value(self, leaf: Node, ids: Sequence[int], conf: Sequence[float], finish: str | None) -> float:
        """Mean confidence of a sample; a sample with no ``<Output>`` on its path is penalised, whether the
        token limit cut it or the model ended it (EOS) without one."""
        value = mean_value(conf) or 0.0
        if output_text(self.text_of(leaf, ids)) is None:
            value = max(0.0, value - self.config.cut_penalty)
        return value

    def _split(self, leaf: Node, ids: Sequence[int]) -> tuple[int, int | None]:
        """(action length, where the thought closes in the sample when a reflection should go there)."""
        c = self.config
        path = self.tree.path_ids(leaf)
        k = action_length(self.backend.decode, ids, c.ministep_tokens, c.max_step_tokens, path,
                          thought_open=not thought_closed(self.backend.decode(path)))
        if not c.reflect or self.has_reflection(leaf):
            return k, None
        close = last_prefix_before(self.backend.decode, ids, THOUGHT_END)
        if close is None or close == 0:
            return k, None
        return k, close

    def _expand(self, leaf: Node, gen: Generation) -> None:
        """A new sample from ``leaf``: its action becomes a child, the rest that child's rollout."""
        if not gen.token_ids:
            return
        c = self.config
        ids, conf = gen.token_ids, self.confidences(gen)
        value = self.sample_value(leaf, ids, conf, gen.finish_reason)
        k, close = self._split(leaf, ids)
        in_action = close is not None and close <= k
        if in_action:
            k = close  # type: ignore[assignment]
        twin = self.twin(leaf, ids[:k])
        if twin is not None:
            self._merge(twin, ids, conf, k, value, gen.finish_reason)
            return
        child = self._action_node(leaf, ids, conf, k, value, gen.finish_reason, copy=False)
        end = child
        if k < len(ids):
            if close is not None and not in_action and c.reflect_rollouts:
                # the rollout closes the thought: its part inside the thought becomes a step with the
                # reflection under it; the model's own closing stays as that step's rollout
                end = self.add_node(child, "step", ids[k:close], conf[k:close], value=value)
                self._rollout(end, ids[close:], conf[close:], value, gen.finish_reason)
                self.add_reflection(end)
            else:
                self._rollout(child, ids[k:], conf[k:], value, gen.finish_reason)
        if in_action:
            self.add_reflection(child)
        self.backprop(end, value)

    def twin(self, leaf: Node, action: Sequence[int]) -> Node | None:
        """The child of ``leaf`` whose action is exactly these tokens (with ``merge``), else None."""
        if not self.config.merge:
            return None
        action = list(action)
        return next((n for n in leaf.children if n.kind in ("step", "ministep") and n.token_ids == action), None)

    def _merge(self, twin: Node, ids: Sequence[int], conf: Sequence[float], k: int, value: float,
               finish: str | None) -> None:
        """A sample whose action is ``twin``'s: one more simulation through ``twin`` (its visits and value
        sum grow), and the rest of the sample a rollout under it marked :data:`MERGED` (empty when the
        sample was only the action), so its tokens, the repeated action's included, count as spent."""
        node = self.add_node(twin, "rollout", ids[k:], conf[k:], value=value, terminal=finish == "stop",
                             finish_reason=MERGED)
        node.answer = self.extract(self.text_of(node))
        self.backprop(twin, value)

    def _reuse(self, leaf: Node) -> None:
        """The first child of ``leaf`` from its stored rollout, with no generation. It inherits the
        simulation that ran through it (one visit, its value), which the ancestors counted already."""
        rollout = self.stored_rollout(leaf)
        assert rollout is not None
        ids, conf = rollout.token_ids, rollout.confidences
        value = rollout.value if rollout.value is not None else 0.0
        k, close = self._split(leaf, ids)
        in_action = close is not None and close <= k
        if in_action:
            k = close  # type: ignore[assignment]
        child = self._action_node(leaf, ids, conf, k, value, rollout.finish_reason, copy=True,
                                  ended=rollout.terminal)
        if k < len(ids):
            self._rollout(child, ids[k:], conf[k:], value, rollout.finish_reason, terminal=rollout.terminal)
        if in_action:
            self.add_reflection(child)
        child.visits, child.value_sum = 1, value
        self.touched[child.id] = child

    def _action_node(
        self, leaf: Node, ids: Sequence[int], conf: Sequence[float], k: int, value: float, finish: str | None,
        copy: bool, ended: bool | None = None,
    ) -> Node:
        kind = "ministep" if self.config.ministep_tokens is not None else "step"
        whole = k == len(ids)
        done = whole and (finish == "stop" if ended is None else ended)
        reason = REUSED if copy else (finish if whole else None)
        child = self.add_node(leaf, kind, ids[:k], conf[:k], value=value, terminal=done, finish_reason=reason)
        if done:
            child.answer = self.extract(self.text_of(child))
        return child

    def _rollout(
        self, parent: Node, ids: Sequence[int], conf: Sequence[float], value: float, finish: str | None,
        terminal: bool | None = None,
    ) -> Node:
        node = self.add_node(parent, "rollout", ids, conf, value=value,
                             terminal=finish == "stop" if terminal is None else terminal, finish_reason=finish)
        node.answer = self.extract(self.text_of(node))
        return node

    # ------------------------------------------------------------------ final answer
    def answer_nodes(self, copies: bool = False) -> list[Node]:
        """Nodes holding an answer (finished ones first, see :func:`prefer_finished`). Without ``copies``
        each sample counts once (a reused rollout's copies are left out), as a vote needs."""
        nodes = [n for n in self.tree if n.answer is not None and (n.terminal or n.kind == "rollout")
                 and (copies or not self.is_copy(n))]
        return self.prefer_finished(nodes) if nodes else []

    def final_value(self, node: Node) -> float:
        """What the final pick compares: the node's value, or the mean confidence of its whole path."""
        if self.config.final_value == "path":
            conf = [c for n in self.tree.path(node) for c in n.confidences]
            return mean_value(conf) or 0.0
        return node.value or 0.0

    def choose(self) -> Node | None:
        select = self.config.select
        if select == "vote":
            return weighted_vote(self.answer_nodes(), self.final_value)
        pool = self.answer_nodes(copies=True)
        if select == "max-value":
            return max(pool, key=self.final_value) if pool else None
        paths = {n.id: {p.id for p in self.tree.path(n)} for n in pool}
        reach = set().union(*paths.values()) if paths else set()
        best: dict[str, float] = {}  # node id -> the best answer's value below it
        for n in pool:
            v = self.final_value(n)
            for i in paths[n.id]:
                best[i] = max(best.get(i, v), v)
        key: Callable[[Node], tuple[float, float]] = {
            "value": lambda n: (n.q, n.visits),
            "visits": lambda n: (n.visits, n.q),
            "robust": lambda n: (n.visits, best[n.id]),
        }[select]
        node = self.tree.root
        while True:
            kids = [k for k in self.children(node) if k.visits > 0 and k.id in reach]
            if not kids:
                break
            node = max(kids, key=key)
        if node.id in paths:
            return node
        # an unfinished node: the best answer below it
        below = [n for n in pool if node.id in paths[n.id]]
        if below:
            return max(below, key=self.final_value)
        return weighted_vote(self.answer_nodes(), self.final_value)


def weighted_vote(nodes: list[Node], value: Callable[[Node], float] | None = None) -> Node | None:
    """The best node of the answer with the largest summed value (``value``: the node's own by default)."""
    value = value or (lambda n: n.value or 0.0)
    groups: dict[str, list[Node]] = defaultdict(list)
    for n in nodes:
        if n.answer is not None:
            groups[n.answer].append(n)
    if not groups:
        return majority(nodes)
    best = max(groups.values(), key=lambda g: sum(value(n) for n in g))
    return max(best, key=value)
