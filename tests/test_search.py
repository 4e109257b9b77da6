"""Search logic with the scripted backend: lockstep batching, budgets, granularity, reflection, UCT,
back-propagation, answer selection, reproducibility and resume."""

from __future__ import annotations

import math

import pytest

from marco.llm.scripted import ScriptedBackend
from marco.search.base import REFLECTION, SearchConfig
from marco.search.driver import LockstepDriver
from marco.search.mcts import MCTSSearch, weighted_vote
from marco.search.sink import RecordingSink
from marco.search.state import MERGED
from marco.search.tree import Node
from marco.tasks import get_task
from marco.tasks.base import Problem

TASK = get_task("demo")


def problems(n: int = 4) -> list[Problem]:
    return [Problem("demo", "en", i, f"Question number {i}?", ("42",)) for i in range(n)]


def run(config: SearchConfig, probs=None, backend=None, sink=None, continuous=True):
    backend = backend or ScriptedBackend()
    driver = LockstepDriver(backend, TASK, config, sink, continuous=continuous)
    return driver.run(probs or problems()), driver, backend


@pytest.mark.parametrize("strategy", ["greedy", "sc", "bon", "mcts"])
def test_one_batched_call_per_round_across_all_searches(strategy):
    # chains of at most 100 tokens: the budget pays for a first wave of all 3
    config = SearchConfig(strategy=strategy, budget=400, n=3, children=2, max_answer_tokens=100)
    results, driver, backend = run(config, problems(5), continuous=False)
    assert len(backend.calls) == driver.stats.backend_calls
    width = {"greedy": 1, "sc": 3, "bon": 3, "mcts": 2}[strategy]
    assert backend.calls[0] == 5 * width  # every search's requests went into the first call together
    assert all(r.answer is not None for r in results)


@pytest.mark.parametrize("strategy", ["greedy", "sc", "bon", "mcts"])
@pytest.mark.parametrize("budget", [60, 250])
def test_budget_is_respected_and_reported(strategy, budget):
    results, _, _ = run(SearchConfig(strategy=strategy, budget=budget, n=3, children=3, reflect=True))
    for r in results:
        generated = sum(n.num_tokens for n in r.tree if n.kind not in ("root", "reflection"))
        # a sample merged into an identical sibling wrote that sibling's action once more
        again = sum(r.tree.nodes[n.parent_id].num_tokens for n in r.tree if n.finish_reason == MERGED)
        assert r.tokens == generated + again
        assert 0 < r.tokens <= budget


def test_ministep_nodes_have_exactly_n_tokens():
    results, _, _ = run(SearchConfig(strategy="mcts", action="ministep:7", budget=600, children=3))
    ministeps = [n for r in results for n in r.tree if n.kind == "ministep"]
    assert ministeps
    for n in ministeps:
        rollouts = [c for c in n.children if c.kind == "rollout"]
        if rollouts:  # the sample went on past the action: the action is exactly N tokens
            assert n.num_tokens == 7
        else:
            assert n.num_tokens <= 7


def test_step_nodes_end_at_a_blank_line_or_the_end_of_the_thought():
    results, _, _ = run(SearchConfig(strategy="mcts", action="step", budget=600, children=2))
    steps = [n for r in results for n in r.tree if n.kind == "step"]
    assert steps
    for n in steps:
        if any(c.kind == "rollout" and c.finish_reason != MERGED for c in n.children):  # the sample went on
            assert n.text.endswith("\n\n") or n.text.endswith("</Thought>")
            assert "\n\n" not in n.text[:-2]


def test_mcts_reflection_is_a_node_of_its_own_and_search_continues_from_it():
    results, _, _ = run(SearchConfig(strategy="mcts", action="step", budget=1500, children=2, reflect=True))
    reflections = [(r, n) for r in results for n in r.tree if n.kind == "reflection"]
    assert reflections
    for r, n in reflections:
        assert REFLECTION in n.text and not n.confidences
        parent = r.tree.nodes[n.parent_id]
        assert "</Thought>" not in parent.text  # cut before the thought closed
        assert sum(1 for p in r.tree.path(n) if p.kind == "reflection") == 1
    assert any(n.children for _, n in reflections)  # later rounds expanded from a reflection


def test_greedy_reflection_continues_after_the_sentence():
    results, _, backend = run(SearchConfig(strategy="greedy", budget=800, reflect=True), problems(2))
    assert len(backend.calls) == 2  # thought, then continuation after the reflection
    for r in results:
        kinds = [n.kind for n in r.tree.path(r.tree.nodes[r.final_node_id])]
        assert kinds == ["root", "step", "reflection", "answer"]
        assert r.answer == "42"


def test_uct_prefers_unvisited_then_balances_value_and_exploration():
    state = MCTSSearch("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig(exploration=1.0))
    root = state.tree.root
    a = state.tree.new_child(root, "ministep")
    b = state.tree.new_child(root, "ministep")
    root.visits, a.visits, a.value_sum = 1, 1, 0.9
    assert state.select() is b  # unvisited first
    b.visits, b.value_sum = 1, 0.2
    root.visits = 2
    assert state.select() is a
    b.visits, b.value_sum, a.visits, a.value_sum, root.visits = 1, 0.5, 40, 40 * 0.6, 41
    expected_a = 0.6 + math.sqrt(math.log(41) / 40)
    expected_b = 0.5 + math.sqrt(math.log(41) / 1)
    assert state.uct(root, a) == pytest.approx(expected_a)
    assert state.uct(root, b) == pytest.approx(expected_b)
    assert state.select() is b


def test_backpropagation_adds_each_rollout_value_to_every_ancestor():
    results, _, _ = run(SearchConfig(strategy="mcts", budget=500, children=3), problems(1))
    tree = results[0].tree
    for n in tree:
        if n.kind == "rollout" or n.kind == "reflection":
            continue
        kids = [c for c in n.children if c.kind not in ("rollout",)]
        if kids and all(k.kind != "reflection" for k in kids):
            # a node's visits are its own evaluation plus its children's (re-scored leaves add to it)
            assert n.visits >= sum(k.visits for k in kids)
            assert n.value_sum == pytest.approx(sum(k.value_sum for k in kids) + (n.value or 0) * (n.visits - sum(k.visits for k in kids)))
    assert tree.root.visits == sum(c.visits for c in tree.root.children)


def test_final_answer_selection_modes():
    def node(answer, value, terminal=True):
        return Node(id=answer + str(value), search_id="s", parent_id=None, depth=1, kind="rollout",
                    answer=answer, value=value, terminal=terminal)

    nodes = [node("41", 0.9), node("42", 0.5), node("42", 0.5)]
    assert weighted_vote(nodes).answer == "42"  # 1.0 summed value beats 0.9
    config = SearchConfig(strategy="mcts", budget=600, children=3)
    by_value, _, _ = run(config, problems(2))
    by_vote, _, _ = run(SearchConfig(strategy="mcts", budget=600, children=3, select="vote"), problems(2))
    for r in by_value + by_vote:
        assert r.final_node_id in r.tree.nodes
        assert r.chosen_path[0] == r.tree.root.id and r.chosen_path[-1] == r.final_node_id


def test_confidence_steers_mcts_to_the_confident_answer():
    # the scripted model is confident writing "42" and unsure writing "41"
    results, _, _ = run(SearchConfig(strategy="mcts", budget=900, children=3), problems(6))
    assert sum(r.answer == "42" for r in results) >= 5
    assert all(r.correct == (r.answer == "42") for r in results)


def test_same_seed_same_search_other_seed_other_search():
    cfg = SearchConfig(strategy="mcts", budget=500, seed=3)
    a, _, _ = run(cfg, problems(2))
    b, _, _ = run(cfg, problems(2))
    c, _, _ = run(SearchConfig(strategy="mcts", budget=500, seed=4), problems(2))
    texts = lambda rs: [[(n.id, n.text, n.visits) for n in r.tree] for r in rs]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


class Crash(RuntimeError):
    pass


class CrashingSink(RecordingSink):
    def __init__(self, after_round: int):
        super().__init__()
        self.after_round = after_round

    def on_round(self, round, new_nodes, updated_nodes):
        super().on_round(round, new_nodes, updated_nodes)
        if round == self.after_round:
            raise Crash()


def stored_nodes(sink: RecordingSink) -> dict[str, list[Node]]:
    """What a store would hold: node rows with their latest statistics (copied, as from a database)."""
    rows: dict[str, Node] = {}
    for _, new, updated in sink.rounds:
        for n in list(new) + list(updated):
            rows[n.id] = Node(**{k: getattr(n, k) for k in Node.__dataclass_fields__ if k != "children"})
    out: dict[str, list[Node]] = {}
    for n in rows.values():
        out.setdefault(n.search_id, []).append(n)
    return out


@pytest.mark.parametrize("strategy,reflect,extra", [
    ("mcts", False, {}), ("mcts", True, {}), ("mcts", False, {"reuse": False}), ("mcts", True, {"action": "step"}),
    ("mcts", False, {"normalize": True, "final_value": "path", "select": "vote"}),
    ("mcts", False, {"fill": True, "widen": True}),
    ("sc", True, {}), ("sc", False, {"max_answer_tokens": 60}), ("bon", False, {"max_answer_tokens": 60}),
    ("greedy", True, {}),
])
def test_resume_after_a_crash_equals_an_uninterrupted_run(strategy, reflect, extra):
    cfg = SearchConfig(**{"strategy": strategy, "budget": 700, "children": 3, "reflect": reflect,
                          "action": "ministep:9", **extra})
    probs = problems(3)
    full, _, _ = run(cfg, probs)
    sink = CrashingSink(after_round=2)
    with pytest.raises(Crash):
        run(cfg, probs, sink=sink)
    resumed = LockstepDriver(ScriptedBackend(), TASK, cfg).run(probs, resume=stored_nodes(sink))
    for a, b in zip(full, resumed):
        assert [(n.id, n.token_ids, n.visits, n.value_sum) for n in a.tree] == [
            (n.id, n.token_ids, n.visits, n.value_sum) for n in b.tree
        ]
        assert (a.answer, a.final_node_id, a.tokens) == (b.answer, b.final_node_id, b.tokens)


@pytest.mark.parametrize("chunk", [None, 1, 2])
@pytest.mark.parametrize("strategy,reflect", [("mcts", False), ("mcts", True), ("sc", True), ("greedy", True)])
def test_continuous_batching_gives_the_same_searches_as_rounds(strategy, reflect, chunk):
    cfg = SearchConfig(strategy=strategy, budget=700, children=3, n=3, reflect=reflect, action="ministep:9")
    rounds, _, _ = run(cfg, problems(4), continuous=False)
    backend = ScriptedBackend()
    backend.chunk = chunk  # requests complete a few at a time: searches move on while others decode
    sink = RecordingSink()
    cont, driver, _ = run(cfg, problems(4), backend=backend, sink=sink)
    for a, b in zip(rounds, cont):
        assert [(n.id, n.token_ids, n.visits, n.value_sum) for n in a.tree] == [
            (n.id, n.token_ids, n.visits, n.value_sum) for n in b.tree
        ]
        assert (a.answer, a.tokens) == (b.answer, b.tokens)
    written = {n.id for _, new, _ in sink.rounds for n in new}
    assert written == {n.id for r in cont for n in r.tree}  # every node reached the sink
    assert len(sink.finished) == 4
