"""Synthesis: stored trees → Marco-o1 CoT examples and preference pairs; every filter; exports TRL reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.data import parse_answer, read_jsonl
from marco.jobs import BackendCache, execute_job
from marco.prompts import SYSTEM_PROMPT
from marco.search.base import SearchConfig
from marco.search.tree import Tree
from marco.store import Store
from marco.synthesis import SynthesisConfig, plan_synthesis, synthesize
from marco.synthesis.build import answer_nodes, assistant_turn
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


def test_default_takes_the_chosen_path_of_every_completed_search(store: Store, stored: dict[str, str]) -> None:
    pending = store.create_batch(_problems(("en",), 1), [MCTS], model="scripted", task="mgsm", name="never-run")
    run_id, outcome = _synth(store, batches=[stored["a"], pending.batch_id])
    assert outcome.status == "done"
    rows = store.cot_examples(run_id)
    searches = {str(s.id): s for s in store.find_searches(stored["a"], limit=None)}
    assert len(rows) == len(searches) == 6  # one per completed search; the pending batch adds nothing
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
        for node in answer_nodes(tree):
            p = Problem("mgsm", problem.lang, problem.index, problem.question, tuple(problem.reference))
            paths.append((str(s.batch_id), s.lang, f"{problem.lang}/{problem.index}/{s.batch_id}", node,
                          task.score(node.answer, p).correct))

    # batch
    run_b, _ = _synth(store, batches=["syn-b"])  # by name
    assert {r.source_batch_id for r in store.cot_examples(run_b)} == {stored["b"]} and len(store.cot_examples(run_b)) == 2
    # language
    run_zh, _ = _synth(store, batches=list(stored.values()), langs=["zh"])
    assert {r.lang for r in store.cot_examples(run_zh)} == {"zh"} and len(store.cot_examples(run_zh)) == 3
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
    values = sorted(p[3].value for p in paths if p[0] == stored["a"])
    while len(set(values)) < 2 and len(value_batches) < 6:
        extra = _run_batch(store, _problems(), f"syn-a{len(value_batches)}")
        value_batches.append(extra)
        values = sorted([*values, *(n.value for s in store.find_searches(extra, limit=None)
                                    for n in answer_nodes(_tree(store, str(s.id))))])
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
    assert len(by_problem) == 6 and all(len(v) == 2 for v in by_problem.values())
    for pid, rows in by_problem.items():
        s = next(x for x in all_searches if str(x.problem_id) == pid)
        best = sorted((n.value for n in answer_nodes(_tree(store, str(s.id)))), reverse=True)[:2]
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
    assert [s["name"] for s in report["steps"]] == ["well_formed", "exact_dedup", "top_k"]
    assert report["steps"][1]["removed"] == len(texts) - len(set(texts))


def test_preference_pairs_set_a_correct_path_against_a_wrong_one(store: Store, stored: dict[str, str]) -> None:
    run_id, _ = _synth(store, batches=[stored["a"]], pairs=True)
    pairs = store.cot_examples(run_id, "preference")
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

    res = runner.invoke(app, ["synthesize", "--batch", stored["a"], "--top-k", "2", "--pairs", "--out", str(tmp_path / "ds"),
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
    assert result.searches == 2 and result.examples
    by_id = {str(s.id): s for s in store.find_searches(plan.batch_id, limit=None)}
    for e in result.examples:
        assert [m["role"] for m in e.messages] == ["system", "user", "assistant"]
        thought, output = parse_answer(e.answer)  # well-formed: one Thought, one Output, both non-empty
        assert thought and output
        tree = store.load_tree(e.meta["search_id"])
        path = [tree.nodes[i] for i in e.meta["node_path"]]
        assert path[0].kind == "root" and all(b.parent_id == a.id for a, b in zip(path, path[1:]))
        assert e.answer == assistant_turn(path, e.meta["answer"])
        assert e.meta["search_id"] in by_id
    store.close()
