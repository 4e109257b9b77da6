"""Issue 8 search semantics with the scripted backend: equal spend, one final-answer rule, stop at
</Output>, special tokens, confidence over majority, selection modes, rollout reuse, the token-limit
penalty, step cuts across nodes, reflection when a rollout closes the thought, and search labels."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from marco.llm.base import GenerationRequest
from marco.llm.scripted import ScriptedBackend
from marco.prompts import strip_special_tokens
from marco.search.actions import action_length
from marco.search.base import SELECTIONS, SearchConfig
from marco.search.driver import LockstepDriver
from marco.search.linear import BestOfN, SelfConsistency
from marco.search.mcts import MCTSSearch
from marco.search.state import MERGED, REUSED
from marco.tasks import get_task
from marco.tasks.base import Problem

TASK = get_task("demo")


def problems(n: int, ref: str = "42") -> list[Problem]:
    return [Problem("demo", "en", i, f"Question number {i}?", (ref,)) for i in range(n)]


class Recording(ScriptedBackend):
    """A scripted backend that keeps every request it was sent."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.requests: list[GenerationRequest] = []

    def _one(self, req, sample):  # type: ignore[no-untyped-def]
        if sample == 0:
            self.requests.append(req)
        return super()._one(req, sample)


def run(config: SearchConfig, probs, backend=None):
    backend = backend or ScriptedBackend()
    driver = LockstepDriver(backend, TASK, config)
    return driver.run(probs), backend


# --------------------------------------------------------------------------------------------------------
# confidence beats the majority


def minority_responder(prefix: str, rng: random.Random) -> str:
    """70% of chains reason sloppily to 41, 30% carefully to 42; a started chain keeps its style."""
    if "Careful" in prefix or ("Guess" not in prefix and rng.random() < 0.3):
        body = "" if "Careful" in prefix else "Careful: six times seven is forty two, so 42.\n"
        return body + "</Thought>\n<Output>42</Output>"
    body = "" if "Guess" in prefix else "Guess: about forty one, so 41.\n"
    return body + "</Thought>\n<Output>41</Output>"


def minority_scorer(text: str, position: int) -> float:
    return 0.95 if "Careful" in text else 0.45


def test_confidence_finds_the_minority_answer_that_the_vote_misses():
    backend = ScriptedBackend(minority_responder, minority_scorer)
    probs = problems(30)
    mcts, _ = run(SearchConfig(strategy="mcts", action="ministep:8", children=6, budget=1500,
                               max_answer_tokens=96), probs, backend)
    bon, _ = run(SearchConfig(strategy="bon", budget=1500, max_answer_tokens=96), probs, backend)
    sc, _ = run(SearchConfig(strategy="sc", budget=1500, max_answer_tokens=96), probs, backend)
    right = lambda rs: sum(r.answer == "42" for r in rs)  # noqa: E731
    assert right(mcts) >= 22 and right(bon) >= 24
    assert right(sc) <= 9
    # the vote saw the right answer in most trees and still chose the majority
    assert sum(any(n.answer == "42" for n in r.tree) for r in sc) >= 24
    # the same search when confidence carries no signal finds the minority answer only by chance (without
    # merging: merged siblings make UCT explore the rarer first action first, which is another signal)
    flat, _ = run(SearchConfig(strategy="mcts", action="ministep:8", children=6, budget=1500,
                               max_answer_tokens=96, merge=False), probs,
                  ScriptedBackend(minority_responder, flat_scorer))
    assert right(flat) <= 15


# --------------------------------------------------------------------------------------------------------
# select: value, visits, vote


def hand_tree(select: str) -> MCTSSearch:
    """Root with A (high Q, 2 visits, answer 7), B (lower Q, 6 visits, answer 8) and C (3 finished answers
    9 under it, each of middling value, the largest summed value)."""
    state = MCTSSearch("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig(select=select))
    tree, root = state.tree, state.tree.root

    def node(parent, answer, value, visits, kind="ministep"):
        n = tree.new_child(parent, kind, value=value, terminal=answer is not None, answer=answer,
                           finish_reason="stop" if answer else None)
        n.visits, n.value_sum = visits, value * visits
        return n

    node(root, "7", 0.95, 2)
    node(root, "8", 0.80, 6)
    c = node(root, None, 0.5, 3)
    for _ in range(3):
        node(c, "9", 0.5, 1)
    root.visits = 11
    return state


@pytest.mark.parametrize("select,answer", [("value", "7"), ("visits", "8"), ("vote", "9")])
def test_each_selection_mode_changes_the_answer(select, answer):
    assert hand_tree(select).choose().answer == answer


# --------------------------------------------------------------------------------------------------------
# one final-answer rule


def answers_state(cls, answers):
    state = cls("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig(strategy="bon"))
    for answer, value, finished in answers:
        text = f"So {answer}.\n</Thought>\n<Output>{answer}</Output>" if finished else f"So {answer}, and"
        n = state.tree.new_child(state.tree.root, "answer", value=value, answer=answer, terminal=finished,
                                 finish_reason="stop" if finished else "length", token_ids=ids(text))
        n.visits, n.value_sum = 1, value
    return state


def test_best_of_n_and_the_vote_prefer_finished_chains():
    bon = answers_state(BestOfN, [("41", 0.6, True), ("42", 0.99, False)])
    assert bon.choose().answer == "41"
    sc = answers_state(SelfConsistency, [("41", 0.6, True), ("42", 0.9, False), ("42", 0.9, False)])
    assert sc.choose().answer == "41"
    only_cut = answers_state(BestOfN, [("41", 0.6, False), ("42", 0.9, False)])
    assert only_cut.choose().answer == "42"  # with no finished chain, the cut ones still answer


def test_mcts_prefers_a_finished_answer_over_a_cut_one_with_more_value():
    state = MCTSSearch("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig())
    root = state.tree.root
    cut = state.tree.new_child(root, "ministep", value=0.99)
    state.tree.new_child(cut, "rollout", value=0.99, answer="41", terminal=False, finish_reason="length",
                         token_ids=ids("So 41 and"))
    ok = state.tree.new_child(root, "ministep", value=0.6)
    state.tree.new_child(ok, "rollout", value=0.6, answer="42", terminal=True, finish_reason="stop",
                         token_ids=ids("</Thought><Output>42</Output>"))
    cut.visits, cut.value_sum, ok.visits, ok.value_sum, root.visits = 1, 0.99, 1, 0.6, 2
    for select in SELECTIONS:
        state.config = SearchConfig(select=select)
        assert state.choose().answer == "42"


# --------------------------------------------------------------------------------------------------------
# equal spend


@pytest.mark.parametrize("strategy", ["sc", "bon"])
@pytest.mark.parametrize("budget", [90, 400, 1500, 4000])
def test_waves_spend_the_budget_less_at_most_one_chain_and_never_more(strategy, budget):
    cap = 120
    config = SearchConfig(strategy=strategy, budget=budget, max_answer_tokens=cap)
    results, backend = run(config, problems(4), Recording())
    for r in results:
        assert budget - cap <= r.tokens <= budget
        assert len(r.tree.root.children) >= max(1, (budget - cap) // cap)
    # a wave is one request per search: n samples of the root
    assert all(req.n >= 1 for req in backend.requests)
    assert any(req.n > 1 for req in backend.requests) == (budget >= 2 * cap)


def test_n_caps_the_chains_and_auto_draws_more():
    capped, _ = run(SearchConfig(strategy="sc", budget=3000, n=3), problems(2))
    auto, _ = run(SearchConfig(strategy="sc", budget=3000), problems(2))
    assert all(len(r.tree.root.children) == 3 for r in capped)
    assert all(len(r.tree.root.children) > 3 for r in auto)
    assert all(a.tokens > c.tokens for a, c in zip(auto, capped))


def test_mcts_stops_when_the_budget_cannot_pay_for_k_typical_rollouts():
    config = SearchConfig(strategy="mcts", action="ministep:8", budget=1500, children=3, max_rounds=500)
    results, backend = run(config, problems(3), Recording())
    for r in results:
        assert r.tokens <= 1500
        samples = [n for n in r.tree if n.kind == "ministep" and n.finish_reason != REUSED
                   and r.tree.nodes[n.parent_id].round < n.round]
        typical = r.tokens / len(samples)
        assert r.tokens >= 1500 - 3 * typical - 1
    # rollouts are never shrunk to a few tokens: every request may write at least a typical sample
    assert min(req.max_new_tokens for req in backend.requests) >= 20


@pytest.mark.parametrize("budget", [700, 1500, 3000])
def test_fill_lets_the_last_expansion_take_what_the_budget_pays(budget):
    base = SearchConfig(strategy="mcts", action="ministep:8", budget=budget, children=3, max_rounds=500)
    plain, _ = run(base, problems(8))
    filled, backend = run(SearchConfig(**{**base.to_dict(), "fill": True}), problems(8), Recording())
    for f in filled:
        samples = [n for n in f.tree if n.kind == "ministep" and n.finish_reason != REUSED
                   and f.tree.nodes[n.parent_id].round < n.round]
        typical = f.tokens / len(samples)
        assert f.tokens <= budget
        assert f.tokens >= budget - typical - 1  # at most one sample short, like the sc/bon waves
    assert sum(f.tokens for f in filled) > sum(p.tokens for p in plain)
    # the last expansion has fewer than k samples, none of them shrunk below a typical length
    assert any(req.n < 2 for req in backend.requests)
    assert min(req.max_new_tokens for req in backend.requests) >= 20


def quick_responder(prefix: str, rng: random.Random) -> str:
    """Every sample answers at once: the first expansion's children are all finished leaves."""
    return f"</Thought>\n<Output>{rng.choice(['41', '42', '42'])}</Output>"


def test_widen_grows_new_chains_from_the_root_when_every_leaf_is_finished():
    # chains of at most 64 tokens: the first expansion's budget pays for all 3 samples at that length
    base = SearchConfig(strategy="mcts", action="ministep:32", budget=400, children=3, max_answer_tokens=64)
    plain, _ = run(base, problems(3), ScriptedBackend(quick_responder))
    wide, _ = run(SearchConfig(**{**base.to_dict(), "widen": True}), problems(3), ScriptedBackend(quick_responder))
    def samples(r):  # root children, and the samples merged into them
        kids = [n for n in r.tree.root.children if n.kind == "ministep"]
        return kids, len(kids) + sum(c.finish_reason == MERGED for n in kids for c in n.children)

    for p, w in zip(plain, wide):
        assert samples(p)[1] == 3 and p.tokens < 100  # the tree is exhausted after one expansion
        kids, drawn = samples(w)
        assert drawn > 3 and all(n.terminal for n in kids)
        assert w.tokens <= 400
        assert w.tokens >= 400 - 3 * (w.tokens / drawn) - 1
        assert len({tuple(n.token_ids) for n in kids}) == len(kids)  # identical samples merged


# --------------------------------------------------------------------------------------------------------
# </Output> and special tokens


def chatty_responder(prefix: str, rng: random.Random) -> str:
    if "</Thought>" in prefix:
        return "<Output>42</Output>\nAnd some more words that cost tokens."
    return "Some thinking.\n</Thought>\n<Output>42</Output>\nAnd some more words that cost tokens."


@pytest.mark.parametrize("strategy", ["greedy", "sc", "bon", "mcts"])
def test_generation_stops_at_the_end_of_the_output_and_that_node_is_terminal(strategy):
    backend = Recording(chatty_responder)
    results, _ = run(SearchConfig(strategy=strategy, budget=400, action="ministep:4", reflect=True), problems(2), backend)
    assert backend.requests and all("</Output>" in req.stop for req in backend.requests)
    for r in results:
        assert "more words" not in "".join(n.text for n in r.tree)
        ends = [n for n in r.tree if n.text.endswith("</Output>")]
        assert ends and all(n.terminal for n in ends)
        assert r.answer == "42"


def eos_responder(prefix: str, rng: random.Random) -> str:
    return "Translating.\n</Thought>\n<Output>\nHola mundo<|im_end|>"


@pytest.mark.parametrize("strategy", ["greedy", "bon", "mcts"])
def test_special_tokens_never_reach_a_translation(strategy):
    task = get_task("translation")
    problem = Problem("flores200", "es", 0, "Hello world", ("Hola mundo",))
    backend = ScriptedBackend(eos_responder)
    result = LockstepDriver(backend, task, SearchConfig(strategy=strategy, budget=300)).run([problem])[0]
    assert result.answer == "Hola mundo"
    assert result.score.value == pytest.approx(1.0)
    # the stored text keeps what the model wrote
    assert any("<|im_end|>" in n.text for n in result.tree)


def test_strip_special_tokens():
    assert strip_special_tokens("42<|endoftext|>") == "42"
    assert strip_special_tokens("Hola</s> mundo<pad>", ["</s>", "<pad>", " "]) == "Hola mundo"
    assert strip_special_tokens("a < b | c > d") == "a < b | c > d"


# --------------------------------------------------------------------------------------------------------
# rollout reuse


def markov_responder(prefix: str, rng: random.Random) -> str:
    """Letters a/b with memory (the next letter repeats the last with probability 0.7), then an answer."""
    letters = [c for c in prefix if c in "ab"]
    last = letters[-1] if letters else "a"
    out = []
    for _ in range(max(0, 24 - len(letters))):
        last = last if rng.random() < 0.7 else ("b" if last == "a" else "a")
        out.append(last)
    return "".join(out) + "</Thought><Output>42</Output>"


def flat_scorer(text: str, position: int) -> float:
    return 0.5  # values never depend on the content (exactly: means of 0.5 have no rounding noise)


def chi_square_p(a: Counter, b: Counter) -> float:
    """p-value of a two-sample chi-square test of homogeneity (Wilson-Hilferty approximation)."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 5]
    na, nb = sum(a[k] for k in keys), sum(b[k] for k in keys)
    stat = 0.0
    for k in keys:
        total = a[k] + b[k]
        for obs, n in ((a[k], na), (b[k], nb)):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(keys) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_rollout_reuse_keeps_the_node_distribution_and_reaches_depth_for_fewer_tokens():
    texts = {True: Counter(), False: Counter()}
    spent = {True: 0, False: 0}
    for reuse in (True, False):
        for seed in range(60):
            # merge=False: merged siblings would change the tree shapes this compares
            config = SearchConfig(strategy="mcts", action="ministep:4", children=3, budget=10_000, max_depth=3,
                                  max_rounds=4, reuse=reuse, seed=seed, merge=False)
            results, _ = run(config, problems(3), ScriptedBackend(markov_responder, flat_scorer))
            for r in results:
                spent[reuse] += r.tokens
                for n in r.tree:
                    if n.kind == "ministep" and n.depth == 2:
                        texts[reuse][n.text] += 1
    assert sum(texts[True].values()) == sum(texts[False].values())  # same tree shapes
    assert chi_square_p(texts[True], texts[False]) > 0.001
    assert spent[True] < 0.85 * spent[False]  # same depth, fewer tokens


def test_a_reused_rollout_becomes_the_first_child_and_is_not_counted_twice():
    config = SearchConfig(strategy="mcts", action="ministep:5", children=2, budget=600, seed=2, max_answer_tokens=120)
    results, backend = run(config, problems(2), Recording())
    for r in results:
        copies = [n for n in r.tree if n.finish_reason == REUSED]
        assert copies
        for c in copies:
            parent = r.tree.nodes[c.parent_id]
            # the parent's own rollout (not one of a sample merged into the parent)
            source = next(k for k in parent.children if k.kind == "rollout" and k.finish_reason != MERGED)
            below = [k for k in c.children if k.kind == "rollout" and k.finish_reason != MERGED]
            assert c.token_ids + (below[0].token_ids if below else []) == source.token_ids
            assert c.index == min(k.index for k in parent.children if k.kind != "rollout")  # the first child
        generated = sum(n.num_tokens for n in r.tree if n.kind not in ("root", "reflection")
                        and n.finish_reason != REUSED
                        and not (n.kind == "rollout" and n.finish_reason != MERGED
                                 and r.tree.nodes[n.parent_id].finish_reason == REUSED))
        again = sum(r.tree.nodes[n.parent_id].num_tokens for n in r.tree if n.finish_reason == MERGED)
        assert r.tokens == generated + again
    # a leaf with a stored rollout asks for k - 1 samples
    assert sorted({req.n for req in backend.requests}) == [1, 2]


# --------------------------------------------------------------------------------------------------------
# values


def long_responder(prefix: str, rng: random.Random) -> str:
    return "thinking " * 40 + "</Thought><Output>42</Output>"


@pytest.mark.parametrize("penalty", [0.0, 0.3, 1.0])
def test_a_rollout_cut_before_an_answer_is_penalised(penalty):
    config = SearchConfig(strategy="mcts", action="ministep:8", children=2, budget=400, max_answer_tokens=60,
                          cut_penalty=penalty, max_rounds=1)
    results, _ = run(config, problems(1), ScriptedBackend(long_responder))
    kids = results[0].tree.root.children
    assert kids and all(k.kind == "ministep" for k in kids)
    for k in kids:
        own = [r for r in k.children if r.finish_reason != MERGED]
        conf = k.confidences + [c for r in own for c in r.confidences]
        assert k.value == pytest.approx(max(0.0, sum(conf) / len(conf) - penalty))
        for m in k.children:  # samples merged into k: the same rule
            if m.finish_reason == MERGED:
                conf = k.confidences + m.confidences
                assert m.value == pytest.approx(max(0.0, sum(conf) / len(conf) - penalty))


def test_final_value_path_compares_whole_paths():
    state = MCTSSearch("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig(select="vote", final_value="path"))
    root = state.tree.root
    # answer 41: a confident last part after an unsure start; 42: steady
    a = state.tree.new_child(root, "ministep", confidences=[0.1] * 10, value=0.5)
    state.tree.new_child(a, "rollout", confidences=[0.99] * 2, value=0.99, answer="41", terminal=True)
    b = state.tree.new_child(root, "ministep", confidences=[0.7] * 10, value=0.7)
    state.tree.new_child(b, "rollout", confidences=[0.7] * 2, value=0.7, answer="42", terminal=True)
    assert state.choose().answer == "42"
    state.config = SearchConfig(select="vote", final_value="node")
    assert state.choose().answer == "41"


def test_normalised_q_among_siblings():
    state = MCTSSearch("s", problems(1)[0], TASK, ScriptedBackend(), SearchConfig(normalize=True, exploration=0.5))
    root = state.tree.root
    kids = [state.tree.new_child(root, "ministep") for _ in range(3)]
    for k, q in zip(kids, (0.80, 0.85, 0.90)):
        k.visits, k.value_sum = 1, q
    root.visits = 3
    qs = state.sibling_q(kids)
    assert [qs[k.id] for k in kids] == pytest.approx([0.0, 0.5, 1.0])
    # Q in a narrow band: without normalisation exploration decides; with it the best child wins
    for k, q, v in zip(kids, (0.80, 0.85, 0.90), (1, 4, 4)):
        k.visits, k.value_sum = v, q * v
    root.visits = 9
    assert state.select() is kids[2]
    state.config = SearchConfig(normalize=False, exploration=0.5)
    assert state.select() is kids[0]


# --------------------------------------------------------------------------------------------------------
# step cuts and reflection


def ids(text: str) -> list[int]:
    return [ord(c) + 1 for c in text]


DECODE = ScriptedBackend().decode


def test_step_finds_a_blank_line_or_thought_end_that_spans_two_nodes():
    assert action_length(DECODE, ids("\nNext step.\n\n"), None, 128, before=ids("First step.\n")) == 1
    assert action_length(DECODE, ids("ught>\n<Output>4"), None, 128, before=ids("so 4.</Tho")) == 5
    # a parent that ended at a blank line: its newline does not start a new blank line
    assert action_length(DECODE, ids("\nNext.\n\nMore"), None, 128, before=ids("First.\n\n")) == len("\nNext.\n\n")
    # after the thought, the output is one step
    assert action_length(DECODE, ids("\n<Output>\n\n42\n\n</Output>"), None, 128, before=ids("x"),
                         thought_open=False) == len("\n<Output>\n\n42\n\n</Output>")


def test_step_nodes_split_only_inside_the_thought():
    results, _ = run(SearchConfig(strategy="mcts", action="step", budget=900, children=2), problems(3))
    for r in results:
        for n in r.tree:
            if n.kind == "step":
                text = "".join(p.text for p in r.tree.path(n))
                closed_before = "</Thought>" in text[: len(text) - len(n.text)]
                if not closed_before and any(c.kind == "rollout" for c in n.children):
                    assert n.text.endswith("\n\n") or n.text.endswith("</Thought>")


def test_reflection_fires_when_a_rollout_closes_the_thought_once_per_path():
    config = SearchConfig(strategy="mcts", action="ministep:4", budget=1200, children=2, reflect=True)
    results, _ = run(config, problems(3))
    for r in results:
        refl = [n for n in r.tree if n.kind == "reflection"]
        assert r.reflections == len(refl) > 0
        for n in refl:
            parent = r.tree.nodes[n.parent_id]
            assert "</Thought>" not in "".join(p.text for p in r.tree.path(parent))
            assert sum(p.kind == "reflection" for p in r.tree.path(n)) == 1
        # from the rollout: the rest of the thought became a step under a 4-token ministep
        assert any(r.tree.nodes[n.parent_id].kind == "step" for n in refl)
    off, _ = run(SearchConfig(strategy="mcts", action="ministep:4", budget=1200, children=2, reflect=True,
                              reflect_rollouts=False), problems(3))
    assert sum(r.reflections for r in off) < sum(r.reflections for r in results)


# --------------------------------------------------------------------------------------------------------
# labels


def test_the_label_names_every_setting_that_changes_the_result():
    base = SearchConfig(strategy="mcts")
    variants = [SearchConfig(strategy="mcts", **{k: v}) for k, v in (
        ("budget", 512), ("children", 4), ("exploration", 0.5), ("temperature", 0.9), ("top_p", 0.8),
        ("action", "step"), ("reflect", True), ("select", "vote"), ("seed", 3), ("reuse", False),
        ("cut_penalty", 0.2), ("final_value", "path"), ("normalize", True), ("max_answer_tokens", 200),
        ("max_rounds", 10), ("max_depth", 5), ("fill", True), ("widen", True), ("merge", False))]
    variants += [SearchConfig(strategy="mcts", select=s) for s in SELECTIONS if s not in ("vote", base.select)]
    variants += [SearchConfig(strategy="sc", n=4), SearchConfig(strategy="sc"), SearchConfig(strategy="bon"),
                 SearchConfig(strategy="greedy")]
    labels = [c.label for c in [base] + variants]
    assert len(set(labels)) == len(labels)
    assert base.label == "mcts/ministep:32/k3/c1/b2048/t0.7/p0.95/value"
    every = SearchConfig(strategy="mcts", reflect=True, reuse=False, normalize=True, cut_penalty=0.3,
                         final_value="path", seed=4, max_rounds=9, max_depth=5, max_answer_tokens=200)
    assert len(every.label) <= 100 and every.label != SearchConfig.from_dict({**every.to_dict(), "seed": 5}).label
    # a budget sweep is one batch: distinct labels, and configs stored before these fields load
    old = SearchConfig.from_dict({"strategy": "sc", "n": 4, "budget": 1024})
    assert old.label == "sc@4/b1024/t0.7/p0.95"


# --------------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
def test_new_mcts_on_the_bundled_model(smollm2):
    problem = get_task("demo").load(None, None, 1)[0]
    config = SearchConfig(strategy="mcts", action="ministep:16", children=3, budget=384, max_answer_tokens=64,
                          reflect=True, seed=3)
    sent: list[GenerationRequest] = []
    generated: list[list[int]] = []
    generate = smollm2.generate

    def spy(requests):  # type: ignore[no-untyped-def]
        sent.extend(requests)
        out = generate(requests)
        generated.extend(g.token_ids for gs in out for g in gs)
        return out

    smollm2.generate = spy
    try:
        result = LockstepDriver(smollm2, TASK, config, continuous=False).run([problem])[0]
    finally:
        del smollm2.generate
    tree = result.tree
    assert 0 < result.tokens <= 384 and result.answer is not None
    assert all("</Output>" in r.stop for r in sent)
    copies = [n for n in tree if n.finish_reason == REUSED]
    assert copies and result.depth >= 2  # rollouts were reused: the tree went deeper than one expansion
    own = lambda n: [k for k in n.children if k.kind == "rollout" and k.finish_reason != MERGED]  # noqa: E731
    for c in copies:
        source = own(tree.nodes[c.parent_id])[0]
        below = own(c)
        assert c.token_ids + (below[0].token_ids if below else []) == source.token_ids
    # what was generated is what the result reports, each token once (a merged sample's repeated action too)
    copied = {c.id for c in copies} | {k.id for c in copies for k in own(c)}
    again = sum(tree.nodes[n.parent_id].num_tokens for n in tree if n.finish_reason == MERGED)
    assert result.tokens == again + sum(n.num_tokens for n in tree if n.kind not in ("root", "reflection")
                                        and n.id not in copied)
    assert result.tokens == sum(len(g) for g in generated)
    assert sum(r.n for r in sent) < 3 * len(sent)  # expansions of a leaf with a rollout asked for k - 1
    assert "<|" not in (result.answer or "")
    assert result.reflections == sum(n.kind == "reflection" for n in tree)
