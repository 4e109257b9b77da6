"""Stored search trees → CoT examples in Marco-o1's format (and preference pairs).

A path is the root-to-answer chain of a stored tree. Its text is what the model wrote along it (steps,
mini-steps, any reflection, the rollout that finished it), decoded from the path's token ids as ONE
sequence with the model's tokenizer (never per-node texts joined: a mini-step boundary inside a multi-byte
character would put U+FFFD on both sides). It is split into the thought and the output: the assistant turn
is ``<Thought>…</Thought>\\n<Output>…</Output>`` after the system prompt and the question exactly as the
search asked it. Every example keeps the search and the node ids it came from.

Only what the model wrote becomes an example: a path must end in a sample the model finished itself with
its own ``<Output>``. A chain cut by the length limit, or one that ended (EOS) without ``<Output>``, is
rejected by the ``finished`` filter even when a last number in it matches the answer; synthesis never
writes an ``<Output>`` the model did not write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from marco.data.examples import CotExample, PreferencePair, chat, format_answer
from marco.data.filters import ExactDedup, Filter, FilterReport, NearDedup, WellFormed, run_filters
from marco.prompts import ASSISTANT_PREFIX, split_thought_output, strip_special_tokens
from marco.search.tree import Node, Tree, make_id
from marco.store.models import ProblemRow, Search
from marco.store.store import problem_from_row
from marco.synthesis.config import SynthesisConfig, SynthesisResult
from marco.synthesis.decode import Decoder, decoder_for
from marco.tasks import get_task
from marco.tasks.base import Problem, Task

_TAGS = re.compile(r"</?\s*(thought|output)\s*>", re.IGNORECASE)
_LOAD_CHUNK = 200  # searches whose nodes are read in one query


@dataclass
class PathCandidate:
    """One answer path of one stored search, with its text decoded as one sequence."""

    search: Search
    problem: Problem
    problem_id: str
    path: list[Node]
    answer: str | None
    correct: bool | None
    value: float
    chosen: bool
    text: str = ""

    @property
    def final(self) -> Node:
        return self.path[-1]


def path_ids(path: Sequence[Node]) -> list[int]:
    """The token ids the model wrote along a path (the root contributes none)."""
    return [t for n in path[1:] for t in n.token_ids]


def path_text(path: Sequence[Node], decode: Decoder) -> str:
    """The completion along a path: the primed ``<Thought>`` and the path's token ids decoded as one
    sequence (special tokens such as an end-of-sequence marker removed).

    A node stored without token ids (none is written so today) contributes its text between the decoded
    runs of its neighbours.
    """
    parts: list[str] = []
    run: list[int] = []
    for n in path[1:]:
        if n.token_ids:
            run.extend(n.token_ids)
            continue
        if run:
            parts.append(decode(run))
            run = []
        parts.append(n.text)
    if run:
        parts.append(decode(run))
    return ASSISTANT_PREFIX + strip_special_tokens("".join(parts))


def unfinished_reason(path: Sequence[Node], text: str) -> str | None:
    """Why a path is not a chain the model finished with its own ``<Output>`` (None when it is)."""
    final = path[-1]
    if final.finish_reason == "length" or not final.terminal:
        return "cut by the length limit before it finished"
    _, output = split_thought_output(text)
    if output is None:
        return "ended without <Output>"
    if not _TAGS.sub("", output).strip():
        return "empty <Output>"
    return None


def assistant_turn(text: str) -> str:
    """``<Thought>…</Thought>\\n<Output>…</Output>`` of a path's text (see :func:`path_text`).

    The thought is everything before the final ``<Output>`` (a reflection included, stray tags from an
    earlier closed thought removed); the output is that ``<Output>``'s content as the model wrote it. A text
    without ``<Output>`` is returned as it is (never given an output it did not write): the ``finished``
    and ``well_formed`` filters reject it.
    """
    thought, output = split_thought_output(text)
    if output is None or not _TAGS.sub("", output).strip():
        return text
    return format_answer(_TAGS.sub("", thought).strip(), _TAGS.sub("", output))


def answer_nodes(tree: Tree) -> list[Node]:
    """Every node that ends a sample with an answer (finished answers, terminal steps, rollouts)."""
    return [n for n in tree if n.answer is not None and (n.terminal or n.kind in ("rollout", "answer"))]


def _tree(nodes: Sequence[Node]) -> Tree:
    tree = Tree(search_id=nodes[0].search_id if nodes else "")
    for n in sorted(nodes, key=lambda n: n.seq):
        n.children = []
        tree.add(n)
    return tree


def candidates(
    store: Any, rows: Sequence[tuple[Search, ProblemRow]], all_paths: bool, tasks: dict[str, Task],
    decoders: dict[str, Decoder],
) -> Iterator[PathCandidate]:
    """The answer paths of stored searches: only each search's chosen path, or (``all_paths``) every one."""
    for start in range(0, len(rows), _LOAD_CHUNK):
        chunk = rows[start : start + _LOAD_CHUNK]
        stored = store.load_nodes_many([str(s.id) for s, _ in chunk])
        for search, prow in chunk:
            nodes = stored.get(str(search.id))
            if not nodes:
                continue
            tree = _tree(nodes)
            problem = problem_from_row(prow)
            task = tasks[str(search.batch_id)]
            decode = decoders[str(search.batch_id)]
            chosen_id = search.final_node_id and str(search.final_node_id)
            finals = answer_nodes(tree) if all_paths else []
            if chosen_id and chosen_id in tree.nodes and all(n.id != chosen_id for n in finals):
                finals.insert(0, tree.nodes[chosen_id])
            for node in finals:
                is_chosen = node.id == chosen_id
                if is_chosen:
                    answer, correct = search.final_answer, search.correct
                    value = search.confidence if search.confidence is not None else node.value
                else:
                    answer = node.answer
                    correct = task.score(answer, problem).correct
                    value = node.value
                path = tree.path(node)
                yield PathCandidate(
                    search=search, problem=problem, problem_id=str(prow.id), path=path, answer=answer,
                    correct=correct, value=float(value or 0.0), chosen=is_chosen, text=path_text(path, decode),
                )  # fmt: skip


def to_example(run_id: str, c: PathCandidate, task: Task) -> CotExample:
    user = next(m["content"] for m in task.messages(c.problem) if m["role"] == "user")
    return CotExample(
        id=make_id("cot", run_id, c.search.id, c.final.id),
        messages=chat(user, assistant_turn(c.text)),
        source=f"search:{c.search.id}",
        lang=c.problem.lang,
        quality=c.value,
        meta={
            "search_id": str(c.search.id), "batch_id": str(c.search.batch_id), "problem_id": c.problem_id,
            "problem": c.problem.key, "dataset": c.problem.dataset, "label": c.search.label,
            "node_path": [n.id for n in c.path], "answer": c.answer, "correct": c.correct, "chosen": c.chosen,
            "unfinished": unfinished_reason(c.path, c.text),
        },
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- filters
class Finished(Filter):
    """Keep paths the model finished itself with its own ``<Output>`` (always the first step)."""

    name = "finished"

    def reject(self, example: CotExample) -> str | None:
        reason = example.meta.get("unfinished")
        return str(reason) if reason else None


class CorrectOnly(Filter):
    """Keep paths whose answer scores correct."""

    name = "correct_only"

    def reject(self, example: CotExample) -> str | None:
        correct = example.meta.get("correct")
        return None if correct is True else ("wrong answer" if correct is False else "answer not scored correct/wrong")


class MinValue(Filter):
    """Keep paths whose value (mean token confidence) is at least ``min_value``."""

    name = "min_value"

    def __init__(self, min_value: float) -> None:
        self.min_value = min_value

    def reject(self, example: CotExample) -> str | None:
        return None if example.quality >= self.min_value else f"value {example.quality:.3f} < {self.min_value}"


class TopKPerProblem(Filter):
    """Keep the first ``k`` examples of each problem (the input comes best value first per problem)."""

    name = "top_k"

    def __init__(self, k: int) -> None:
        self.k = k
        self._counts: dict[str, int] = {}

    def reset(self) -> None:
        self._counts = {}

    def reject(self, example: CotExample) -> str | None:
        key = str(example.meta.get("problem"))
        n = self._counts.get(key, 0)
        if n >= self.k:
            return f"problem {key} already has {self.k} path(s)"
        self._counts[key] = n + 1
        return None


def steps_for(config: SynthesisConfig) -> list[Filter]:
    steps: list[Filter] = [Finished(), WellFormed()]
    if config.correct_only:
        steps.append(CorrectOnly())
    if config.min_value is not None:
        steps.append(MinValue(config.min_value))
    if config.dedup in ("exact", "near"):
        steps.append(ExactDedup())
    if config.dedup == "near":
        steps.append(NearDedup(config.near_threshold))
    if config.top_k is not None:
        steps.append(TopKPerProblem(config.top_k))
    return steps


def preference_pairs(run_id: str, examples: Iterable[CotExample]) -> list[PreferencePair]:
    """Per problem: its best-valued correct answer against its best-valued wrong one (same prompt)."""
    best: dict[str, dict[bool, CotExample]] = {}
    order: list[str] = []
    for e in examples:
        correct = e.meta.get("correct")
        if correct is None or e.meta.get("unfinished") or WellFormed().reject(e) is not None:
            continue
        key = str(e.meta["problem"])
        if key not in best:
            best[key] = {}
            order.append(key)
        held = best[key].get(bool(correct))
        if held is None or e.quality > held.quality:
            best[key][bool(correct)] = e
    pairs = []
    for key in order:
        good, bad = best[key].get(True), best[key].get(False)
        if good is None or bad is None:
            continue
        pairs.append(
            PreferencePair(
                id=make_id("pair", run_id, good.id, bad.id), prompt=good.messages[:-1], chosen=good.answer,
                rejected=bad.answer, source=good.source, lang=good.lang,
                meta={"problem": key, "chosen": good.meta, "rejected": bad.meta,
                      "chosen_value": good.quality, "rejected_value": bad.quality},
            )
        )  # fmt: skip
    return pairs


def batch_decoder(store: Any, batch: Any) -> Decoder:
    """The tokenizer decode of the model a reasoning batch ran (from its ``models`` row)."""
    spec = store.model_spec(str(batch.model_id)) if batch.model_id else None
    if not spec:
        raise ValueError(f"batch {batch.name} ({batch.id}) records no model: cannot decode its token ids")
    if spec.startswith("checkpoint:"):
        spec = store.checkpoint_path(spec)
    return decoder_for(spec)


STEP_KINDS = ("step", "ministep")


def _split_common(a: str, b: str) -> tuple[str, str, str]:
    """``(common prefix, rest of a, rest of b)``."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n], a[n:], b[n:]


def step_pairs(
    run_id: str, tree: Tree, search: Search, problem: Problem, problem_id: str, task: Task, decode: Decoder,
    margin: float,
) -> list[PreferencePair]:
    """Sibling-step preference pairs of one tree: at each node with two or more visited step children, the
    highest-Q child's step against the lowest-Q one (when Q differs by at least ``margin``).

    Prefix and steps are decoded as whole sequences (prefix + step) and split at their common text, so a
    boundary inside a multi-byte character never leaves U+FFFD in either side.
    """
    user = next(m["content"] for m in task.messages(problem) if m["role"] == "user")
    prompt = chat(user)
    out: list[PreferencePair] = []
    for node in tree:
        kids = [c for c in node.children if c.kind in STEP_KINDS and c.visits > 0 and c.token_ids]
        if len(kids) < 2:
            continue
        ranked = sorted(kids, key=lambda c: (c.q, -c.index), reverse=True)
        good, bad = ranked[0], ranked[-1]
        if good.q - bad.q < margin:
            continue
        prefix_ids = path_ids(tree.path(node))
        whole_good = strip_special_tokens(decode(prefix_ids + good.token_ids))
        whole_bad = strip_special_tokens(decode(prefix_ids + bad.token_ids))
        common, chosen, rejected = _split_common(whole_good, whole_bad)
        if not chosen.strip() or not rejected.strip():
            continue
        out.append(PreferencePair(
            id=make_id("step-pair", run_id, search.id, good.id, bad.id), prompt=prompt, chosen=chosen,
            rejected=rejected, source=f"search:{search.id}", lang=problem.lang,
            meta={"kind": "step", "prefix": ASSISTANT_PREFIX + common, "problem": problem.key,
                  "chosen": {"search_id": str(search.id), "batch_id": str(search.batch_id), "problem_id": problem_id,
                             "node_path": [n.id for n in tree.path(good)], "dataset": problem.dataset},
                  "rejected": {"search_id": str(search.id), "node_path": [n.id for n in tree.path(bad)],
                               "answer": None},
                  "chosen_value": good.q, "rejected_value": bad.q, "depth": node.depth},
        ))  # fmt: skip
    return out


def tree_step_pairs(
    store: Any, run_id: str, rows: Sequence[tuple[Search, ProblemRow]], tasks: dict[str, Task],
    decoders: dict[str, Decoder], margin: float,
) -> list[PreferencePair]:
    """:func:`step_pairs` of every stored search in ``rows``."""
    pairs: list[PreferencePair] = []
    for start in range(0, len(rows), _LOAD_CHUNK):
        chunk = rows[start : start + _LOAD_CHUNK]
        stored = store.load_nodes_many([str(s.id) for s, _ in chunk])
        for search, prow in chunk:
            nodes = stored.get(str(search.id))
            if nodes:
                b = str(search.batch_id)
                pairs += step_pairs(run_id, _tree(nodes), search, problem_from_row(prow), str(prow.id), tasks[b],
                                    decoders[b], margin)  # fmt: skip
    return pairs


def synthesize(store: Any, config: SynthesisConfig, run_id: str) -> SynthesisResult:
    """Build (without writing) the examples and pairs ``config`` selects from ``store``."""
    rows = store.completed_searches(config.batches or None, config.dataset, config.langs or None)
    tasks: dict[str, Task] = {}
    decoders: dict[str, Decoder] = {}
    for batch_id in {str(s.batch_id) for s, _ in rows}:
        batch = store.get_batch(batch_id)
        tasks[batch_id] = get_task((batch.config or {}).get("task") or batch.dataset or "")
        decoders[batch_id] = batch_decoder(store, batch)
    all_paths = config.top_k is not None or config.pairs
    found = [to_example(run_id, c, tasks[str(c.search.batch_id)])
             for c in candidates(store, rows, all_paths, tasks, decoders)]  # fmt: skip
    # problems in dataset order; within each, best value first (the chosen path wins a tie)
    problem_rank: dict[str, int] = {}
    for e in found:
        problem_rank.setdefault(e.meta["problem"], len(problem_rank))
    ordered = sorted(found, key=lambda e: (problem_rank[e.meta["problem"]], -e.quality, not e.meta["chosen"]))
    kept, report = run_filters(ordered, steps_for(config), FilterReport())
    for i, e in enumerate(kept):
        e.meta["order"] = i
    pairs = preference_pairs(run_id, ordered) if config.pairs else []
    if config.step_pairs:
        pairs += tree_step_pairs(store, run_id, rows, tasks, decoders, config.pair_margin)
    return SynthesisResult(run_id, kept, pairs, report, searches=len(rows), problems=len(problem_rank))


# ------------------------------------------------------------------------------------------- storage
def example_row(run_id: str, e: CotExample) -> dict[str, Any]:
    m = e.meta
    return {
        "id": e.id, "run_id": run_id, "kind": "sft", "source_batch_id": m.get("batch_id"),
        "search_id": m.get("search_id"), "problem_id": m.get("problem_id"), "node_path": list(m.get("node_path", [])),
        "messages": e.messages, "rejected": None, "rejected_search_id": None, "rejected_path": [],
        "answer": m.get("answer"), "correct": m.get("correct"), "quality": float(e.quality),
        "dataset": m.get("dataset"), "lang": e.lang, "meta": {k: v for k, v in m.items() if k != "node_path"},
    }  # fmt: skip


def pair_row(run_id: str, p: PreferencePair, order: int) -> dict[str, Any]:
    good, bad = p.meta["chosen"], p.meta["rejected"]
    step = {"kind": "step", "prefix": p.meta["prefix"], "depth": p.meta.get("depth")} if p.meta.get("kind") == "step" else {}
    return {
        "id": p.id, "run_id": run_id, "kind": "preference", "source_batch_id": good.get("batch_id"),
        "search_id": good.get("search_id"), "problem_id": good.get("problem_id"),
        "node_path": list(good.get("node_path", [])),
        "messages": [*p.prompt, {"role": "assistant", "content": p.chosen}], "rejected": p.rejected,
        "rejected_search_id": bad.get("search_id"), "rejected_path": list(bad.get("node_path", [])),
        "answer": good.get("answer"), "correct": None if step else True, "quality": float(p.meta["chosen_value"]),
        "dataset": good.get("dataset"), "lang": p.lang,
        "meta": {"order": order, "problem": p.meta["problem"], "rejected_answer": bad.get("answer"),
                 "rejected_value": p.meta["rejected_value"], **step},
    }  # fmt: skip


def row_to_example(row: Any) -> CotExample:
    meta = dict(row.meta or {})
    meta["node_path"] = list(row.node_path or [])
    return CotExample(
        id=str(row.id), messages=list(row.messages), source=f"search:{row.search_id}" if row.search_id else "store",
        lang=row.lang or "", quality=float(row.quality), meta=meta,
    )  # fmt: skip


def row_to_pair(row: Any) -> PreferencePair:
    messages = list(row.messages)
    return PreferencePair(
        id=str(row.id), prompt=messages[:-1], chosen=messages[-1]["content"], rejected=row.rejected or "",
        source=f"search:{row.search_id}" if row.search_id else "store", lang=row.lang or "",
        meta={**(row.meta or {}), "node_path": list(row.node_path or []), "rejected_path": list(row.rejected_path or [])},
    )  # fmt: skip
