"""The state machine every strategy implements, so the lockstep driver can batch any mix of searches.

A round is: ``plan()`` returns the generation requests this search needs now; the driver batches the
requests of every open search into ONE backend call; ``absorb()`` turns the answers into tree nodes. All
of a search's state lives in its tree, so a search rebuilt from stored nodes continues exactly where it
stopped, and the sampling seed of every request derives from the tree (never from a global counter).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

from marco.confidence import rollout_value, token_confidences
from marco.llm.base import Backend, Generation, GenerationRequest
from marco.prompts import ASSISTANT_PREFIX, OUTPUT_END, output_text, strip_special_tokens
from marco.search.base import REFLECTION, SearchConfig, SearchResult
from marco.search.tree import Node, NodeKind, Tree, make_id
from marco.tasks.base import Problem, Task

ANSWER_BEARING = ("answer", "rollout", "step", "ministep")
REFLECTION_TEXT = "\n" + REFLECTION + "\n"
# finish_reason of an action node made from a stored rollout (rollout reuse): its tokens, and those of the
# rollout under it, were generated once already and are not counted again
REUSED = "reused"
# finish_reason of the first node of a sample merged into an identical sibling (MCTS ``merge``): a rollout
# under that sibling holding the rest of the sample (empty when the sample was only the action). The
# sample generated the sibling's action tokens once more, so they are counted once more in the spend.
MERGED = "merged"


def derive_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:7], "big")


class SearchState:
    """Shared machinery: the tree, the prompt, node creation, token accounting and the final result."""

    def __init__(
        self,
        search_id: str,
        problem: Problem,
        task: Task,
        backend: Backend,
        config: SearchConfig,
        nodes: Sequence[Node] | None = None,
    ) -> None:
        self.search_id = search_id
        self.problem = problem
        self.task = task
        self.backend = backend
        self.config = config
        self.prompt_ids = backend.apply_chat_template(task.messages(problem), ASSISTANT_PREFIX)
        tokenizer = getattr(backend, "tokenizer", None)
        self.special_tokens: tuple[str, ...] = tuple(getattr(tokenizer, "all_special_tokens", None) or ())
        self.tree = Tree(search_id)
        self.started = time.perf_counter()
        self.elapsed_before = 0.0
        self.new_nodes: list[Node] = []
        self.touched: dict[str, Node] = {}
        self.done = False
        self.round = 0
        if nodes:
            self._restore(nodes)
        else:
            root = Node(id=make_id(search_id, "root"), search_id=search_id, parent_id=None, depth=0, kind="root",
                        text=problem.question)
            self.tree.add(root)
            self.new_nodes.append(root)

    # ------------------------------------------------------------------ restore
    def _restore(self, nodes: Sequence[Node]) -> None:
        for n in sorted(nodes, key=lambda n: n.seq):
            n.children = []
            self.tree.add(n)
        self.round = max((n.round for n in nodes), default=0)

    # ------------------------------------------------------------------ the round protocol
    def plan(self) -> list[GenerationRequest]:
        raise NotImplementedError

    def absorb(self, generations: list[list[Generation]]) -> None:
        raise NotImplementedError

    def drain(self) -> tuple[list[Node], list[Node]]:
        """Nodes created and nodes whose statistics changed since the last drain."""
        new, self.new_nodes = self.new_nodes, []
        new_ids = {n.id for n in new}
        touched = [n for i, n in self.touched.items() if i not in new_ids]
        self.touched = {}
        return new, touched

    # ------------------------------------------------------------------ helpers
    def is_copy(self, node: Node) -> bool:
        """True for nodes whose tokens were generated once already (made from a reused rollout)."""
        if node.finish_reason == REUSED:
            return True
        return node.kind == "rollout" and node.finish_reason != MERGED and node.parent_id is not None and \
            self.tree.nodes[node.parent_id].finish_reason == REUSED

    @property
    def tokens_spent(self) -> int:
        """Generated tokens: every node's own tokens, except the inserted reflection sentences and copies,
        plus :meth:`merged_tokens`."""
        own = sum(n.num_tokens for n in self.tree if n.kind not in ("root", "reflection") and not self.is_copy(n))
        return own + self.merged_tokens()

    def merged_tokens(self) -> int:
        """Action tokens generated again by samples merged into an identical sibling: each merged sample
        wrote its sibling's action once more (the node holds those tokens once)."""
        return sum(self.tree.nodes[n.parent_id].num_tokens for n in self.tree  # type: ignore[index]
                   if n.finish_reason == MERGED)

    @property
    def budget_left(self) -> int:
        return self.config.budget - self.tokens_spent

    def prefix_ids(self, node: Node) -> list[int]:
        return self.prompt_ids + self.tree.path_ids(node)

    def text_of(self, node: Node, extra: Sequence[int] = ()) -> str:
        """Everything the model wrote from the start of its answer to ``node`` (plus ``extra`` tokens)."""
        return ASSISTANT_PREFIX + self.backend.decode(self.tree.path_ids(node) + list(extra))

    def add_node(
        self, parent: Node, kind: NodeKind, gen_ids: Sequence[int], confidences: Sequence[float], **fields: object
    ) -> Node:
        node = self.tree.new_child(
            parent, kind, text=self.backend.decode(gen_ids) if kind != "reflection" else REFLECTION_TEXT,
            token_ids=list(gen_ids), confidences=list(confidences), round=self.round, **fields,
        )
        self.new_nodes.append(node)
        return node

    def add_reflection(self, parent: Node) -> Node:
        ids = self.backend.encode(REFLECTION_TEXT)
        return self.add_node(parent, "reflection", ids, [], value=parent.value)

    def has_reflection(self, node: Node) -> bool:
        return any(n.kind == "reflection" for n in self.tree.path(node))

    def request(self, node: Node, n: int, max_new: int, greedy: bool = False, stop: tuple[str, ...] = ()) -> GenerationRequest:
        """``n`` samples continuing ``node``. Every request stops at ``</Output>`` (the answer is complete
        there; the stop string is kept), besides any ``stop`` of the caller."""
        c = self.config
        return GenerationRequest(
            prompt_ids=self.prefix_ids(node), max_new_tokens=max(1, max_new), stop=tuple(stop) + (OUTPUT_END,),
            temperature=0.0 if greedy else c.temperature, top_p=1.0 if greedy else c.top_p, n=n,
            seed=derive_seed(c.seed, node.id, len(node.children)),
        )

    @staticmethod
    def confidences(gen: Generation) -> list[float]:
        return token_confidences(gen.logprobs, gen.top_logprobs)

    def extract(self, text: str) -> str | None:
        """The task's answer in ``text``, read with the tokenizer's special tokens (``<|im_end|>`` ...) removed."""
        return self.task.extract(strip_special_tokens(text, self.special_tokens), self.problem)

    def backprop(self, node: Node, value: float) -> None:
        for n in self.tree.path(node):
            n.visits += 1
            n.value_sum += value
            self.touched[n.id] = n

    def finished(self, node: Node) -> bool:
        """Ended by the model (a stop string or end-of-sequence), not cut by a length limit, with an answer
        in an ``<Output>`` it wrote. A sample that ended without ``<Output>`` is treated like a cut one: the
        answer the task reads from it (e.g. its last number) is a guess, not a finished answer."""
        return node.terminal and node.answer is not None and output_text(self.text_of(node)) is not None

    def prefer_finished(self, nodes: Sequence[Node]) -> list[Node]:
        """:func:`prefer_finished` with this search's rule of what is finished."""
        return prefer_finished(nodes, self.finished)

    # ------------------------------------------------------------------ result
    def choose(self) -> Node | None:
        raise NotImplementedError

    def result(self) -> SearchResult:
        final = self.choose()
        answer = final.answer if final is not None else None
        score = self.task.score(answer, self.problem)
        return SearchResult(
            search_id=self.search_id, problem=self.problem, config=self.config, tree=self.tree,
            final_node_id=final.id if final else None, answer=answer,
            confidence=final.value if final else None, tokens=self.tokens_spent, rounds=self.round,
            elapsed_s=self.elapsed_before + time.perf_counter() - self.started, score=score,
            chosen_path=[n.id for n in self.tree.path(final)] if final else [],
        )


def mean_value(confidences: Sequence[float]) -> float | None:
    return rollout_value(confidences)


def prefer_finished(nodes: Sequence[Node], finished: Callable[[Node], bool]) -> list[Node]:
    """The one final-answer rule of every strategy: finished nodes (see :meth:`SearchState.finished`) when
    there are any, else the nodes with an answer (cut by a length limit, or ended without an ``<Output>``),
    else all of them."""
    done = [n for n in nodes if finished(n)]
    if done:
        return done
    answered = [n for n in nodes if n.answer is not None]
    return answered or list(nodes)
