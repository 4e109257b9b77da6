"""Synthesis: stored trees → Marco-o1 CoT examples and preference pairs; every filter; exports TRL reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.data import format_answer, parse_answer, read_jsonl
from marco.jobs import BackendCache, execute_job
from marco.prompts import SYSTEM_PROMPT
from marco.search.base import SearchConfig
from marco.search.tree import Tree
from marco.store import Store
from marco.synthesis import SynthesisConfig, plan_synthesis, synthesize
from marco.synthesis.build import answer_nodes, assistant_turn, path_text
from marco.synthesis.decode import decoder_for
from marco.tasks import get_task
from marco.tasks.base import Problem

runner = CliRunner()
MCTS = SearchConfig(strategy="mcts", action="ministep:8", budget=200, children=2, seed=3)


def _problems(langs=("en", "zh"), n=3, dataset="mgsm") -> list[Problem]:
    # The scripted model answers 42 (mostly) or 41: both right and wrong paths exist in every tree.
    return [Problem(dataset, lang, i, f"Problem {i}: what is {i} * 42 / {i}?", ("42",)) for lang in langs for i in range(n)]


def _run_batch(store: Store, problems: list[Problem], name: str, config: SearchConfig = MCTS,
               batch_id: str | None = None) -> str:
    plan = store.create_batch(problems, [config], model="scripted", task="mgsm", chunk_size=len(problems), name=name,
                              batch_id=batch_id)  # fmt: skip
    for job in plan.job_ids:
        assert execute_job(store, job, BackendCache(), worker="t").status == "done"
    return plan.batch_id


def _synth(store: Store, **kw) -> tuple[str, object]:
    """Plan and run a synthesis job; returns (run_id, SynthesisResult-like summary from the batch)."""
    run_id, job = plan_synthesis(store, SynthesisConfig(**kw))
    outcome = execute_job(store, job, BackendCache(), worker="t")
    return run_id, outcome


@pytest.fixture()
def stored(store: Store) -> dict[str, str]:
    return {"a": _run_batch(store, _problems(), "syn-a"), "b": _run_batch(store, _problems(("en",), 2), "syn-b")}


def _tree(store: Store, search_id: str) -> Tree:
    return store.load_tree(search_id)


def _finished_answers(tree: Tree) -> list:
    """Answer nodes of chains the model finished with its own <Output> (scripted text is ASCII: joining is safe)."""
    return [n for n in answer_nodes(tree) if n.terminal and n.finish_reason != "length"
            and "<Output>" in "".join(m.text for m in tree.path(n))]


def test_default_takes_the_chosen_path_of_every_completed_search(store: Store, stored: dict[str, str]) -> None:
    pending = store.create_batch(_problems(("en",), 1), [MCTS], model="scripted", task="mgsm", name="never-run")
    run_id, outcome = _synth(store, batches=[stored["a"], pending.batch_id])
    assert outcome.status == "done"
    rows = store.cot_examples(run_id)
    searches = {str(s.id): s for s in store.find_searches(stored["a"], limit=None)}
    # one per completed search whose chosen path the model finished with <Output>; the pending batch adds nothing
    finished = {sid for sid, s in searches.items()
                if _tree(store, sid).nodes[str(s.final_node_id)].terminal
                and "<Output>" in "".join(n.text for n in _tree(store, sid).path(_tree(store, sid).nodes[str(s.final_node_id)]))}
    assert len(searches) == 6 and {str(r.search_id) for r in rows} == finished and len(rows) == len(finished) > 0
    report = store.get_batch(run_id).config["result"]["report"]
    assert report["steps"][0]["name"] == "finished" and report["steps"][0]["removed"] == 6 - len(finished)
    task = get_task("mgsm")
    for row in rows:
        s = searches[str(row.search_id)]
        assert row.node_path == list(s.chosen_path) and row.node_path[-1] == str(s.final_node_id)
        assert row.quality == pytest.approx(s.confidence) and row.correct == s.correct and row.answer == s.final_answer
        system, user, assistant = row.messages
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert system["content"] == SYSTEM_PROMPT
        problem = store.get_problem(str(row.problem_id))
        assert user["content"] == task.messages(Problem("mgsm", problem.lang, problem.index, problem.question))[1]["content"]
        thought, output = parse_answer(assistant["content"])
        assert output == s.final_answer  # the scripted answer is a bare number inside <Output>
        tree = _tree(store, str(s.id))
        path_text = "".join(tree.nodes[i].text for i in s.chosen_path[1:])
        assert thought and thought in path_text  # the path's own steps, in order
        assert row.source_batch_id == stored["a"] and row.run_id == run_id


def test_assistant_turn_keeps_reflection_in_the_thought(store: Store) -> None:
    import uuid

    config = SearchConfig(strategy="mcts", action="step", budget=1200, children=2, seed=5, reflect=True)
    # Trees depend on their ids (sampling seeds derive from them): a fixed batch id makes this one reproducible.
    batch_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"test-reflect-{store.dialect}"))
    batch = _run_batch(store, _problems(("en",), 4), "reflect", config, batch_id=batch_id)
    run_id, outcome = _synth(store, batches=[batch], top_k=20, dedup="none")
    assert outcome.status == "done"
    reflected = [r for r in store.cot_examples(run_id) if any(
        store.load_tree(str(r.search_id)).nodes[i].kind == "reflection" for i in r.node_path)]
    assert reflected, "some path should pass through a reflection node"
    for r in reflected:
        thought, _ = parse_answer(r.messages[-1]["content"])
        assert "Wait! Maybe I made some mistakes!" in thought


def test_filters_each_narrow_as_specified(store: Store, stored: dict[str, str]) -> None:
    task = get_task("mgsm")
    # (the Postgres database is shared by the session: stay within this test's batches)
    all_searches = [*store.find_searches(stored["a"], limit=None), *store.find_searches(stored["b"], limit=None)]
    # every answer path of every tree, with its own correctness and value, computed here independently
    paths = []
    for s in all_searches:
        tree = _tree(store, str(s.id))
        problem = store.get_problem(str(s.problem_id))
        for node in _finished_answers(tree):
            p = Problem("mgsm", problem.lang, problem.index, problem.question, tuple(problem.reference))
            paths.append((str(s.batch_id), s.lang, f"{problem.lang}/{problem.index}/{s.batch_id}", node,
                          task.score(node.answer, p).correct))

    def chosen_finished(search) -> bool:
        tree = _tree(store, str(search.id))
        return any(n.id == str(search.final_node_id) for n in _finished_answers(tree))

    # batch
    run_b, _ = _synth(store, batches=["syn-b"])  # by name
    want_b = sum(chosen_finished(x) for x in all_searches if str(x.batch_id) == stored["b"])
    assert {r.source_batch_id for r in store.cot_examples(run_b)} <= {stored["b"]} and len(store.cot_examples(run_b)) == want_b
    # language
    run_zh, _ = _synth(store, batches=list(stored.values()), langs=["zh"])
    want_zh = sum(chosen_finished(x) for x in all_searches if x.lang == "zh")
    assert {r.lang for r in store.cot_examples(run_zh)} == {"zh"} and len(store.cot_examples(run_zh)) == want_zh
    # dataset
    other = _run_batch(store, _problems(("en",), 1, dataset="demo"), "syn-demo")
    run_ds, _ = _synth(store, batches=[*stored.values(), other], dataset="demo")
    assert [r.source_batch_id for r in store.cot_examples(run_ds)] == [other]
    # correct only (over every path): exactly the correct paths, after exact de-duplication
    run_c, _ = _synth(store, batches=[stored["a"]], correct_only=True, top_k=100, dedup="none")
    kept = store.cot_examples(run_c)
    want = [p for p in paths if p[0] == stored["a"] and p[4] is True]
    assert kept and all(r.correct is True and r.answer == "42" for r in kept)
    assert len(kept) == len(want)
    # minimum value: only paths at or above it, and every such path. The scripted answers are random (seeds
    # come from node ids), so now and then every path of a batch scores alike (all "42": seen in CI); more
    # batches then join until two values differ, and the threshold sits above the lowest one.
    value_batches = [stored["a"]]
    values = sorted(p[3].value for p in paths if p[0] == stored["a"])  # (finished paths only)
    while len(set(values)) < 2 and len(value_batches) < 6:
        extra = _run_batch(store, _problems(), f"syn-a{len(value_batches)}")
        value_batches.append(extra)
        values = sorted([*values, *(n.value for s in store.find_searches(extra, limit=None)
                                    for n in _finished_answers(_tree(store, str(s.id))))])
    threshold = min(v for v in values if v > values[0])
    run_v, _ = _synth(store, batches=value_batches, min_value=threshold, top_k=100, dedup="none")
    kept_v = store.cot_examples(run_v)
    assert all(r.quality >= threshold for r in kept_v)
    assert len(kept_v) == sum(1 for v in values if v >= threshold) < len(values)
    # top-k per problem: at most k, the best values of each problem
    run_k, _ = _synth(store, batches=[stored["a"]], top_k=2, dedup="none")
    by_problem: dict[str, list] = {}
    for r in store.cot_examples(run_k):
        by_problem.setdefault(str(r.problem_id), []).append(r)
    searches_a = [x for x in all_searches if str(x.batch_id) == stored["a"]]
    n_finished = {str(x.problem_id): len(_finished_answers(_tree(store, str(x.id)))) for x in searches_a}
    assert {pid: len(v) for pid, v in by_problem.items()} == {pid: min(2, n) for pid, n in n_finished.items() if n}
    assert any(len(v) == 2 for v in by_problem.values())
    for pid, rows in by_problem.items():
        s = next(x for x in all_searches if str(x.problem_id) == pid)
        best = sorted((n.value for n in _finished_answers(_tree(store, str(s.id)))), reverse=True)[:2]
        assert sorted((r.quality for r in rows), reverse=True) == pytest.approx(best)
    # de-duplication: without it identical answers repeat; exact removes them; near removes at least as many
    # (random scripted trees may repeat no path: batches of the same problems join until some path repeats)
    dedup_batches = [stored["a"]]
    while True:
        run_none, _ = _synth(store, batches=dedup_batches, top_k=100, dedup="none")
        texts = [(r.messages[1]["content"], r.messages[2]["content"]) for r in store.cot_examples(run_none)]
        if len(set(texts)) < len(texts) or len(dedup_batches) >= 6:
            break
        dedup_batches.append(_run_batch(store, _problems(), f"syn-dedup{len(dedup_batches)}"))
    run_exact, _ = _synth(store, batches=dedup_batches, top_k=100, dedup="exact")
    run_near, _ = _synth(store, batches=dedup_batches, top_k=100, dedup="near", near_threshold=0.7)
    exact = [(r.messages[1]["content"], r.messages[2]["content"]) for r in store.cot_examples(run_exact)]
    assert len(set(texts)) < len(texts), "the scripted trees repeat some paths"
    assert len(exact) == len(set(exact)) == len(set(texts))
    assert len(store.cot_examples(run_near)) <= len(exact)
    report = store.get_batch(run_exact).config["result"]["report"]
    assert [s["name"] for s in report["steps"]] == ["finished", "well_formed", "exact_dedup", "top_k"]
    assert report["steps"][2]["removed"] == len(texts) - len(set(texts))


def test_preference_pairs_set_a_correct_path_against_a_wrong_one(store: Store, stored: dict[str, str]) -> None:
    # (only finished chains count: random scripted trees may hold no finished wrong path; batches join until one does)
    batches = [stored["a"]]
    while True:
        run_id, _ = _synth(store, batches=batches, pairs=True)
        pairs = store.cot_examples(run_id, "preference")
        if pairs or len(batches) >= 6:
            break
        batches.append(_run_batch(store, _problems(), f"syn-pairs{len(batches)}"))
    assert pairs
    for p in pairs:
        assert p.correct is True and p.answer == "42"
        assert parse_answer(p.messages[-1]["content"])[1] == "42"
        assert parse_answer(p.rejected)[1] != "42" and p.meta["rejected_answer"] != "42"
        assert p.rejected_path and p.rejected_path != p.node_path
        assert p.messages[:2] == store.cot_examples(run_id)[0].messages[:2] or p.messages[1]["role"] == "user"


def test_no_example_fails_the_job_with_its_reason(store: Store, stored: dict[str, str]) -> None:
    run_id, outcome = _synth(store, batches=[stored["a"]], min_value=1.0)
    assert outcome.status == "failed" and "no example passed the filters" in outcome.error
    assert store.get_batch(run_id).status == "failed" and store.cot_examples(run_id) == []


def test_cli_exports_datasets_and_jsonl_that_trl_reads(store: Store, stored: dict[str, str], db_url: str,
                                                       tmp_path: Path) -> None:
    from datasets import load_from_disk
    from trl.data_utils import apply_chat_template, is_conversational

    # (a pair needs a finished wrong path: random scripted trees may hold none; batches join until one does)
    batches = [stored["a"]]
    while not synthesize(store, SynthesisConfig(batches=batches, pairs=True), "probe").pairs and len(batches) < 6:
        batches.append(_run_batch(store, _problems(), f"syn-cli{len(batches)}"))
    res = runner.invoke(app, ["synthesize", "--batch", ",".join(batches), "--top-k", "2", "--pairs", "--out", str(tmp_path / "ds"),
                              "--jsonl", str(tmp_path / "cot.jsonl"), "--pairs-out", str(tmp_path / "pairs"),
                              "--in-process", "--db", db_url, "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    ds = load_from_disk(str(tmp_path / "ds"))
    assert len(ds) == summary["examples"] == len(read_jsonl(tmp_path / "cot.jsonl")) > 0
    assert is_conversational(ds[0]) and [m["role"] for m in ds[0]["messages"]] == ["system", "user", "assistant"]
    pairs = load_from_disk(str(tmp_path / "pairs"))
    assert len(pairs) == summary["pairs"] > 0 and is_conversational(pairs[0])

    class Tok:  # TRL renders conversational rows through the tokenizer's chat template
        def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=False, **kw):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    text = apply_chat_template(dict(ds[0]), Tok())
    assert "<Thought>" in text["text"] and "<Output>" in text["text"]
    rendered = apply_chat_template(dict(pairs[0]), Tok())
    assert {"prompt", "chosen", "rejected"} <= set(rendered) and rendered["chosen"] != rendered["rejected"]

    bad = runner.invoke(app, ["synthesize", "--batch", "no-such-batch", "--in-process", "--db", db_url])
    assert bad.exit_code == 1 and "no batch 'no-such-batch'" in bad.stderr and bad.stderr.count("\n") == 1
    bad = runner.invoke(app, ["synthesize", "--top-k", "0", "--db", db_url])
    assert bad.exit_code == 1 and "--top-k" in bad.stderr


@pytest.mark.slow
def test_real_model_trees_give_well_formed_examples(tmp_path: Path, data_dir: Path, smollm2) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'real.db'}")
    problems = get_task("mgsm").load(str(data_dir), ["en"], 2)
    config = SearchConfig(strategy="mcts", action="ministep:16", budget=96, children=2, max_depth=3,
                          max_answer_tokens=48, seed=1)  # fmt: skip
    plan = store.create_batch(problems, [config], model="smollm2", task="mgsm", chunk_size=2)
    cache = BackendCache()
    cache.put("smollm2", smollm2)
    assert execute_job(store, plan.job_ids[0], cache, worker="t").status == "done"
    result = synthesize(store, SynthesisConfig(top_k=3, dedup="none"), run_id="r")
    # At these small budgets the 135M model often runs out of tokens: such chains are not examples (issue 15).
    finished = result.report.steps[0]
    assert result.searches == 2 and finished.name == "finished" and finished.seen > 0
    assert all(r.startswith(("cut by the length limit", "ended without <Output>", "empty <Output>"))
               for _, r in finished.samples)
    assert len(result.examples) <= finished.seen - finished.removed
    by_id = {str(s.id): s for s in store.find_searches(plan.batch_id, limit=None)}
    for e in result.examples:
        assert [m["role"] for m in e.messages] == ["system", "user", "assistant"]
        thought, output = parse_answer(e.answer)  # well-formed: one Thought, one Output, both non-empty
        assert thought and output
        tree = store.load_tree(e.meta["search_id"])
        path = [tree.nodes[i] for i in e.meta["node_path"]]
        assert path[0].kind == "root" and all(b.parent_id == a.id for a, b in zip(path, path[1:]))
        assert e.answer == assistant_turn(path_text(path, decoder_for("smollm2")))
        assert "\ufffd" not in e.answer and e.meta["unfinished"] is None
        assert e.meta["search_id"] in by_id
    store.close()


# ------------------------------------------------------------------ only what the model wrote (issue 15)
def _stored_path(store: Store, model: str, decode, problem: Problem, steps: list[tuple[str, list[int], dict]],
                 answer: str, correct: bool) -> str:
    """A completed search whose tree is one root-to-answer chain of ``steps`` (kind, token ids, fields), the
    last step chosen: as a search writes it (each node's text is its own ids decoded on their own)."""
    from marco.search.base import SearchResult
    from marco.search.tree import Node, make_id
    plan = store.create_batch([problem], [MCTS], model=model, task="mgsm", chunk_size=1)
    search = store.find_searches(plan.batch_id, limit=None)[0]
    sid = str(search.id)
    tree = Tree(search_id=sid)
    node = tree.add(Node(id=make_id(sid, "root"), search_id=sid, parent_id=None, depth=0, kind="root", visits=1))
    for kind, ids, fields in steps:
        node = tree.new_child(node, kind, text=decode(ids), token_ids=list(ids), confidences=[0.9] * len(ids),
                              value=0.9, visits=1, value_sum=0.9, **fields)  # fmt: skip
    node.answer = answer
    store.write_nodes(list(tree))
    from marco.tasks.base import Score

    store.write_results([SearchResult(
        search_id=sid, problem=problem, config=MCTS, tree=tree, final_node_id=node.id, answer=answer,
        confidence=0.9, tokens=sum(len(i) for _, i, _ in steps), score=Score(correct=correct, value=float(correct)),
        chosen_path=[n.id for n in tree.path(node)],
    )])  # fmt: skip
    return plan.batch_id


def test_only_chains_the_model_finished_with_its_own_output_become_examples(store: Store) -> None:
    """Issue 15, defect 1 (failed before: the cut chain became an example ending ``<Output>42</Output>``)."""
    from marco.llm.scripted import ScriptedBackend

    enc, dec = ScriptedBackend().encode, ScriptedBackend().decode
    p = Problem("mgsm", "en", 0, "What is 6 * 7?", ("42",))
    # cut by the length limit: a last number matches, but the model never wrote <Output>
    cut = _stored_path(store, "scripted", dec, p, [
        ("ministep", enc("6 * 7 is 42, and then "), {}),
        ("rollout", enc("we check 42 and so we keep goin"), {"finish_reason": "length", "terminal": False}),
    ], answer="42", correct=True)  # fmt: skip
    # ended by EOS without <Output>
    eos = _stored_path(store, "scripted", dec, p, [
        ("ministep", enc("6 * 7 is "), {}),
        ("rollout", enc("42. The answer is 42."), {"finish_reason": "stop", "terminal": True}),
    ], answer="42", correct=True)  # fmt: skip
    # cut inside its <Output> (a partial answer is still a cut chain)
    inside = _stored_path(store, "scripted", dec, p, [
        ("rollout", enc("6 * 7 = 42\n</Thought>\n<Output>\n4"), {"finish_reason": "length", "terminal": False}),
    ], answer="4", correct=False)  # fmt: skip
    done = _stored_path(store, "scripted", dec, p, [
        ("ministep", enc("6 * 7 is 42.\n"), {}),
        ("rollout", enc("</Thought>\n<Output>\n42\n</Output>"), {"finish_reason": "stop", "terminal": True}),
    ], answer="42", correct=True)  # fmt: skip

    result = synthesize(store, SynthesisConfig(batches=[cut, eos, inside, done], correct_only=True, dedup="none"), "r")
    assert [e.meta["batch_id"] for e in result.examples] == [done]
    assert result.examples[0].answer == "<Thought>\n6 * 7 is 42.\n</Thought>\n<Output>\n42\n</Output>"
    finished = result.report.steps[0]
    assert finished.name == "finished" and finished.removed == 3
    reasons = " / ".join(r for _, r in finished.samples)
    assert "cut by the length limit" in reasons and "without <Output>" in reasons
    # nothing anywhere writes an <Output> the model did not write
    for batch in (cut, eos):
        with pytest.raises(ValueError, match="no example passed"):
            from marco.synthesis.job import run_synthesis

            run_synthesis(store, f"run-{batch}", {"synthesis": {"batches": [batch], "dedup": "none"}})
    pairs = synthesize(store, SynthesisConfig(batches=[cut, eos, inside, done], pairs=True, dedup="none"), "r").pairs
    assert pairs == []  # the only wrong path was cut: no pair


@pytest.mark.slow
def test_zh_ministeps_decode_as_one_sequence_with_the_real_tokenizer(store: Store, data_dir: Path) -> None:
    """Issue 15, defect 2 (failed before: per-node texts joined put U+FFFD around every split character)."""
    import csv

    from transformers import AutoTokenizer

    from marco.llm.export import local_model

    tok = AutoTokenizer.from_pretrained(local_model("smollm2"))
    with (data_dir / "mgsm" / "mgsm_zh.tsv").open(encoding="utf-8") as f:
        question, gold = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    thought = f"题目：{question}\n我们一步一步地算。"
    ids = tok.encode(thought, add_special_tokens=False)
    ministeps = [ids[i : i + 32] for i in range(0, len(ids), 32)]
    assert len(ministeps) >= 3
    per_node = [tok.decode(m) for m in ministeps]
    assert any("\ufffd" in t for t in per_node), "some 32-token boundary should split a character"
    end = tok.encode(f"\n</Thought>\n<Output>\n{gold}\n</Output>", add_special_tokens=False)
    steps = [("ministep", m, {}) for m in ministeps] + [("rollout", end, {"finish_reason": "stop", "terminal": True})]
    p = Problem("mgsm", "zh", 0, question, (gold,))
    batch = _stored_path(store, "smollm2", tok.decode, p, steps, answer=gold, correct=True)

    result = synthesize(store, SynthesisConfig(batches=[batch], dedup="none"), "r")
    assert len(result.examples) == 1
    text = result.examples[0].answer
    whole = tok.decode(ids + end)
    assert "\ufffd" not in text and thought in text
    assert text == format_answer(whole.split("\n</Thought>")[0], gold)


def test_step_pairs_set_a_higher_value_sibling_step_against_a_lower_one(store: Store) -> None:
    """Sibling-step preference pairs: the shared prefix is the prompt, the two steps are chosen/rejected."""
    from marco.llm.scripted import ScriptedBackend
    from marco.search.base import SearchResult
    from marco.search.tree import Node, make_id
    from marco.synthesis.build import step_pairs

    sb = ScriptedBackend()
    p = Problem("mgsm", "en", 0, "What is 6 * 7?", ("42",))
    plan = store.create_batch([p], [MCTS], model="scripted", task="mgsm", chunk_size=1)
    sid = str(store.find_searches(plan.batch_id, limit=None)[0].id)
    tree = Tree(search_id=sid)
    root = tree.add(Node(id=make_id(sid, "root"), search_id=sid, parent_id=None, depth=0, kind="root", visits=3))

    def child(parent, text, q, visits=1, kind="ministep"):
        ids = sb.encode(text)
        return tree.new_child(parent, kind, text=text, token_ids=ids, confidences=[q] * len(ids), value=q,
                              visits=visits, value_sum=q * visits)  # fmt: skip

    first = child(root, "6 * 7 means six sevens", 0.8, visits=3)
    good = child(first, ", so 6 * 7 = 42.", 0.9, visits=2)
    bad = child(first, ", so 6 * 7 = 13.", 0.2)
    close = child(root, "Let me think", 0.75)  # within the margin of `first`: no pair at the root
    store.write_nodes(list(tree))
    store.write_results([SearchResult(search_id=sid, problem=p, config=MCTS, tree=tree, final_node_id=good.id,
                                      answer="42", chosen_path=[n.id for n in tree.path(good)])])  # fmt: skip

    pairs = synthesize(store, SynthesisConfig(batches=[plan.batch_id], step_pairs=True, dedup="none"), "r").pairs
    assert len(pairs) == 1 and close.id not in str(pairs[0].meta)
    pair = pairs[0]
    assert pair.meta["kind"] == "step" and pair.meta["prefix"] == "<Thought>\n6 * 7 means six sevens, so 6 * 7 = "
    assert (pair.chosen, pair.rejected) == ("42.", "13.")
    assert pair.meta["chosen_value"] == pytest.approx(0.9) and pair.meta["rejected_value"] == pytest.approx(0.2)
    assert [m["role"] for m in pair.prompt] == ["system", "user"]
    # the margin is respected: at 0.8 no sibling pair differs enough
    loaded = store.load_tree(sid)
    task = get_task("mgsm")
    search = store.get_search(sid)
    assert step_pairs("r", loaded, search, p, "pid", task, sb.decode, margin=0.8) == []
