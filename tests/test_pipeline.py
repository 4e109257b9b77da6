"""Pipelines: the spec file and the splits policy, stage chaining by the scheduler (rounds of expert
iteration, the evaluation matrix), a failed stage and its resume, and a small pipeline end to end through
real Celery workers (real Redis, Postgres and SmolLM2)."""

from __future__ import annotations

import re

import json
from pathlib import Path
from typing import Sequence

import pytest
import yaml
from typer.testing import CliRunner

from marco.cli import app
from marco.llm.base import Backend, Generation, GenerationRequest
from marco.llm.scripted import ScriptedBackend
from marco.pipeline import PipelineSpec
from marco.pipeline.report import pipeline_report, pipeline_status
from marco.pipeline.service import drive, resume, start
from marco.store import Store
from marco.tasks.splits import EVALUATION_ONLY, TUNING, check_trainable

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = {"strategy": "mcts", "action": "ministep:16", "budget": 400, "children": 2, "max_depth": 3,
               "max_answer_tokens": 160, "seed": 1}  # fmt: skip  (scripted tokens are characters)


def spec_dict(tmp_path: Path, **over) -> dict:
    base = {
        "name": "t", "model": "smollm2", "task": "arith-train", "rounds": 1,
        "train": {"langs": ["en"], "start": 0, "limit": 2}, "search": TINY_SEARCH, "chunk": 2, "synthesize": {},
        "sft": {"max_steps": 2, "batch_size": 1, "max_length": 256, "learning_rate": 1e-4, "nproc": 1},
        "evaluation": {"datasets": [{"dataset": "arith-heldout", "limit": 2}],
                       "matrix": [{"models": ["base", "last"], "strategies": ["greedy"], "budgets": [48]}],
                       "search": {"max_answer_tokens": 24}},
        "out": str(tmp_path / "pipelines"),
    }  # fmt: skip
    return {**base, **over}


def test_example_files_and_spec_validation(tmp_path: Path) -> None:
    spec = PipelineSpec.from_yaml(ROOT / "examples" / "pipeline.yaml")
    assert spec.task == "arith-train" and spec.search_config().strategy == "mcts"
    assert spec.sft_config("d", spec.model, "o").nproc == 2
    second = PipelineSpec.from_yaml(ROOT / "examples" / "expert-iteration-round2.yaml")
    assert second.model.startswith("checkpoint:") and second.train.start >= 640  # problems round one never saw
    assert {m: [r.strategy for r in rs] for m, rs in second.eval_runs().items()} == {"base": ["greedy"],
                                                                                       "round1": ["greedy"]}
    table = PipelineSpec.from_yaml(ROOT / "examples" / "marco-o1-table.yaml")
    small = PipelineSpec.from_yaml(ROOT / "examples" / "table-small.yaml")
    for s in (table, small):  # the paper's table shape: base/trained greedy, MCTS three ways, sc and bon
        runs, last = s.eval_runs(), f"round{s.rounds}"
        assert [r.strategy for r in runs["base"]] == ["greedy"]
        assert [r.strategy for r in runs[last]] == ["greedy", "mcts:step", "mcts:ministep:64", "mcts:ministep:32"]
        matched = s.eval_runs(matched=True)
        assert list(matched) == [last] and [r.strategy for r in matched[last]] == ["sc", "bon"]
        mcts_budgets = {r.budget for r in runs[last] if r.strategy.startswith("mcts")}
        assert {r.budget for r in matched[last]} == mcts_budgets
        assert set(s.matches(last).values()) == {"mcts:ministep:32"}
        assert f"eval/{last}/mgsm/matched" in [st.name for st in s.stages()]
        assert [(d.dataset, d.langs) for d in s.evaluation.datasets] == [
            ("arith-heldout", ["en"]), ("arith-hard", ["en"]), ("mgsm", ["en", "zh"])]
    assert table.rounds == 2 and [st.name for st in table.stages()][:4] == [
        "round1/search", "round1/synthesize", "round1/train", "round2/search"]
    assert next(st for st in table.stages() if st.name == "round2/search").after == "round1/train"
    assert next(st for st in table.stages() if st.name == "eval/round2/mgsm").after == "round2/train"
    assert next(st for st in table.stages() if st.name == "eval/base/mgsm").after is None
    for bad, message in (
        ({"epochs_x": 1}, "unknown pipeline key"),
        ({"search": {"strategy": "beam"}}, "search: unknown strategy"),
        ({"sft": {"data": "x"}}, "set by the pipeline"),
        ({"synthesize": {"top_k": 0}}, "--top-k"),
        ({"name": ""}, "needs a name"),
        ({"test": {"limit": 2}}, "replaced by evaluation"),
        ({"evaluation": None}, "needs evaluation"),
        ({"train_from": "scratch"}, "train_from must be one of"),
        ({"evaluation": {"datasets": [{"dataset": "arith-train"}], "matrix": [{"models": ["base"], "strategies": ["greedy"]}]}},
         "is the training split"),
        ({"evaluation": {"datasets": [{"dataset": "flores200"}], "matrix": [{"models": ["base"], "strategies": ["greedy"]}]}},
         "right or wrong"),
        ({"evaluation": {"datasets": [{"dataset": "mgsm"}], "matrix": [{"models": ["round3"], "strategies": ["greedy"]}]}},
         "rounds 1..1"),
        ({"evaluation": {"datasets": [{"dataset": "mgsm"}], "matrix": [{"models": ["base"], "strategies": ["beam"]}]}},
         "evaluation.matrix: unknown strategy"),
        ({"evaluation": {"datasets": [{"dataset": "mgsm"}], "matrix": [{"models": ["base"], "strategies": ["greedy"]}],
                         "search": {"budget": 5}}}, "come from the matrix"),
        ({"evaluation": {"datasets": [{"dataset": "mgsm"}], "matrix": [
            {"models": ["base"], "strategies": ["greedy"], "budgets": [64]},
            {"models": ["base"], "strategies": ["sc"], "budgets": [128], "match": "greedy"}]}}, "needs a block running it"),
        ({"evaluation": {"datasets": [{"dataset": "mgsm"}], "matrix": [
            {"models": ["base"], "strategies": ["greedy", "sc"], "budgets": [64]},
            {"models": ["base"], "strategies": ["sc"], "budgets": [64], "match": "greedy"}]}}, "keep one"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            PipelineSpec.from_dict(spec_dict(tmp_path, **bad))
    with pytest.raises(ValueError, match="'last' needs rounds >= 1"):
        PipelineSpec.from_dict(spec_dict(tmp_path, rounds=0))
    (tmp_path / "p.yaml").write_text("name: [unclosed")
    res = runner.invoke(app, ["pipeline", "run", str(tmp_path / "p.yaml"), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 1 and "not valid YAML" in res.stderr and res.stderr.count("\n") == 1
    res = runner.invoke(app, ["pipeline", "status", "00000000-0000-0000-0000-000000000000", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 1 and "no pipeline" in res.stderr
    # a pipeline stored by the one-round, before/after marco: its status says so instead of a traceback
    store = Store.open(f"sqlite:///{tmp_path / 'x.db'}")
    store.create_stage_batch("train", {}, config={"pipeline_id": "old", "pipeline_stage": "train",
                                                  "pipeline": {"name": "x", "task": "mgsm", "test": {"limit": 2}}})
    res = runner.invoke(app, ["pipeline", "status", "old", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 1 and "written by an older marco" in res.stderr
    store.close()


@pytest.mark.parametrize("dataset", sorted(EVALUATION_ONLY | TUNING))
def test_a_pipeline_that_trains_on_an_evaluation_split_is_refused_at_load(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(ValueError, match="train on arith-train"):
        check_trainable(dataset)
    with pytest.raises(ValueError, match=f"'{dataset}' is (an evaluation|the tuning) split"):
        PipelineSpec.from_dict(spec_dict(tmp_path, task=dataset))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec_dict(tmp_path, task=dataset)))
    db = tmp_path / "x.db"
    res = runner.invoke(app, ["pipeline", "run", str(tmp_path / "p.yaml"), "--db", f"sqlite:///{db}"])
    assert res.exit_code == 1 and "split" in res.stderr and "arith-train" in res.stderr
    assert not db.exists()  # refused before the store is opened: nothing written
    check_trainable("arith-train")  # the training split passes
    PipelineSpec.from_dict(spec_dict(tmp_path, task=dataset, rounds=0, evaluation={  # evaluate-only: no training
        "datasets": [{"dataset": "mgsm"}], "matrix": [{"models": ["base"], "strategies": ["greedy"]}]}))


def test_sft_sources_mix_the_rounds_synthesis_with_the_extra_files(tmp_path: Path) -> None:
    """A round's ``sft: sources`` (e.g. a gold-CoT JSONL) are mixed with the round's own synthesis, which is
    one more source of weight 1 (dropped only when the synthesis kept no example)."""
    sources = [{"path": str(tmp_path / "gold.jsonl"), "weight": 0.5}]
    raw = spec_dict(tmp_path, sft={**spec_dict(tmp_path)["sft"], "sources": sources})
    config = PipelineSpec.from_dict(raw).sft_config("synthesis:x", "smollm2", "out")
    assert config.data == ""
    assert [(s["path"], s["weight"]) for s in config.sources] == [("synthesis:x", 1.0), (str(tmp_path / "gold.jsonl"), 0.5)]
    plain = PipelineSpec.from_dict(spec_dict(tmp_path)).sft_config("synthesis:x", "smollm2", "out")
    assert plain.data == "synthesis:x" and plain.sources == []
    alone = PipelineSpec.from_dict(raw).sft_config("synthesis:x", "smollm2", "out", with_synthesis=False)
    assert [(s["path"], s["weight"]) for s in alone.sources] == [(str(tmp_path / "gold.jsonl"), 0.5)]


def test_a_round_whose_synthesis_kept_nothing_trains_on_its_other_sources(tmp_path: Path, monkeypatch) -> None:
    """A base model that cannot write the answer format yet (SmolLM2 finished 0 of 48 sampled chains with
    its own <Output>) gives a first round with no example. With other SFT sources (gold CoT) the round goes
    on and trains on them alone, the synthesis's reason in the report; without, the pipeline stops there."""
    from marco.tasks.arith import gold_cot_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _fake_sft(monkeypatch, tmp_path)
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps(r) + "\n" for r in gold_cot_rows("arith-train", 100, 4)))
    search = {**TINY_SEARCH, "budget": 200}
    keep_none = {"min_value": 1.0}  # no scripted path is fully confident: nothing passes

    store = Store.open(f"sqlite:///{tmp_path / 'p.db'}")
    dispatcher = _inline(store)
    plain = PipelineSpec.from_dict(spec_dict(tmp_path, model="scripted", search=search, synthesize=keep_none))
    status = drive(store, dispatcher, start(store, dispatcher, plain))
    assert status["status"] == "failed" and status["failed_stage"] == "round1/synthesize"
    assert "no example passed the filters" in status["error"] and "loosen the filters" in status["error"]
    assert calls == []

    monkeypatch.setattr("marco.synthesis.build.decoder_for", lambda spec: ScriptedBackend().decode)
    sft = {**spec_dict(tmp_path)["sft"], "sources": [{"path": str(gold), "weight": 1.0}]}
    mixed = PipelineSpec.from_dict(spec_dict(tmp_path, model="scripted", search=search, synthesize=keep_none, sft=sft))
    pid = "22222222-2222-3333-4444-555555555555"
    from marco.pipeline.stages import stage_batch_id
    from marco.pipeline.training import training_run_id
    from marco.search.tree import make_id

    ckpt = "checkpoint:" + make_id("model", "checkpoint", training_run_id(make_id("job", stage_batch_id(pid, "round1/train"), 0)))
    dispatcher.runtime.backends.put(ckpt, ScriptedBackend())
    status = drive(store, dispatcher, start(store, dispatcher, mixed, pipeline_id=pid))
    assert status["status"] == "done", status
    report = pipeline_report(store, pid)
    synthesis = report["rounds"][0]["synthesis"]
    assert synthesis["examples"] == 0 and "no example passed the filters" in synthesis["empty"]
    assert store.cot_examples(synthesis["run_id"]) == []
    assert len(calls) == 1 and [s["path"] for s in calls[0].sources] == [str(gold)]  # the gold file alone
    training = report["rounds"][0]["training"]
    assert training["model"] == ckpt and training["n_examples"] == 4
    assert [r["model"] for r in report["table"]] == ["scripted", ckpt]
    store.close()


class Crashing:
    """A backend that dies on its first generate() call (a broken GPU, an OOM)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.name = backend, backend.name

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        raise RuntimeError("CUDA error: device lost")

    def generate_continuous(self, requests, refill) -> None:
        raise RuntimeError("CUDA error: device lost")

    def __getattr__(self, name: str):
        return getattr(self.backend, name)


def _inline(store: Store):
    from scheduler.dispatch import InlineDispatcher

    dispatcher = InlineDispatcher(store=store)
    dispatcher.runtime._backends = None
    return dispatcher


def test_failed_stage_stops_the_pipeline_with_its_reason_and_resume_continues(tmp_path: Path, monkeypatch) -> None:
    """In-process: the scheduler's ticks chain round1/search → synthesize → train. The first stages fail
    (their backend dies), resume re-runs them; the pipeline then stops at `train` (a scripted model is not
    trainable), with that reason."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = Store.open(f"sqlite:///{tmp_path / 'p.db'}")
    dispatcher = _inline(store)
    dispatcher.runtime.backends.put("scripted", Crashing(ScriptedBackend()))
    spec = PipelineSpec.from_dict(spec_dict(tmp_path, model="scripted", search={**TINY_SEARCH, "budget": 200}))
    pid = start(store, dispatcher, spec)
    status = drive(store, dispatcher, pid)
    assert status["status"] == "failed" and status["failed_stage"] == "round1/search"
    assert "device lost" in status["error"]
    stages = {s["stage"]: s["status"] for s in status["stages"]}
    assert stages["eval/base/arith-heldout"] == "failed"
    assert [stages[n] for n in ("round1/synthesize", "round1/train", "eval/round1/arith-heldout")] == ["pending"] * 3

    dispatcher.runtime.backends.put("scripted", ScriptedBackend())
    requeued = resume(store, dispatcher, pid)
    assert requeued
    status = drive(store, dispatcher, pid)
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["round1/search"]["status"] == "done" and stages["round1/synthesize"]["status"] == "done"
    assert stages["eval/base/arith-heldout"]["status"] == "done"
    assert stages["round1/train"]["status"] == "failed" and status["failed_stage"] == "round1/train"
    assert stages["eval/round1/arith-heldout"]["status"] == "pending"
    # the synthesis stage took the chosen path of each train-split search the model finished (with <Output>)
    run_id = stages["round1/synthesize"]["batch_id"]
    examples = store.cot_examples(run_id)
    assert 1 <= len(examples) <= 2
    assert all(e.messages[-1]["content"].rstrip().endswith("</Output>") for e in examples)
    assert {str(e.source_batch_id) for e in store.cot_examples(run_id)} == {stages["round1/search"]["batch_id"]}
    searched = [p for _, p in store.batch_rows(stages["round1/search"]["batch_id"])]
    assert {p.dataset for p in searched} == {"arith-train"} and sorted(p.index for p in searched) == [0, 1]
    res = runner.invoke(app, ["pipeline", "status", pid, "--json", "--db", f"sqlite:///{tmp_path / 'p.db'}"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["failed_stage"] == "round1/train"
    assert [(r["model_key"], r["strategy"], r["n"]) for r in report["table"]] == [("base", "greedy", 2)]
    store.close()


def _fake_sft(monkeypatch, tmp_path: Path) -> list:
    """run_sft without training: a checkpoint folder, two losses, and the registration callback."""
    from marco.sft.config import SFTResult

    calls: list = []

    def fake(config, on_checkpoint=None, check=None):
        ckpt = Path(config.output_dir) / "final"
        ckpt.mkdir(parents=True, exist_ok=True)
        calls.append(config)
        result = SFTResult(str(ckpt), [2.0, 1.5], {"steps": 2}, 1.0, config)
        if on_checkpoint is not None:
            on_checkpoint(result)
        return result

    monkeypatch.setattr("marco.sft.run_sft", fake)
    return calls


@pytest.mark.parametrize("train_from", ["previous", "base"])
def test_two_rounds_of_expert_iteration_chain_models_and_lineage(tmp_path: Path, monkeypatch, train_from: str) -> None:
    """Round 2 searches fresh training problems with round 1's checkpoint and trains from it (``previous``)
    or from the base model; every checkpoint is registered with its parent; each round's model is evaluated.
    SFT itself is replaced (a scripted model cannot train; tests/test_lineage.py trains for real), and the
    checkpoints are served by the scripted backend under their ``checkpoint:ID`` names."""
    from marco.pipeline.stages import stage_batch_id
    from marco.pipeline.training import training_run_id
    from marco.search.tree import make_id

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = _fake_sft(monkeypatch, tmp_path)
    # the fake checkpoints are scripted models: synthesis decodes their token ids with the scripted tokenizer
    monkeypatch.setattr("marco.synthesis.build.decoder_for", lambda spec: ScriptedBackend().decode)
    store = Store.open(f"sqlite:///{tmp_path / 'p.db'}")
    dispatcher = _inline(store)
    pid = "11111111-2222-3333-4444-555555555555"
    ckpt = {r: "checkpoint:" + make_id("model", "checkpoint", training_run_id(make_id("job", stage_batch_id(pid, f"round{r}/train"), 0)))
            for r in (1, 2)}  # fmt: skip
    for name in ("scripted", *ckpt.values()):
        dispatcher.runtime.backends.put(name, ScriptedBackend())
    raw = spec_dict(tmp_path, model="scripted", rounds=2, train_from=train_from, synthesize={"correct_only": False})
    raw["evaluation"]["matrix"] = [{"models": ["base", "rounds"], "strategies": ["greedy"], "budgets": [48]},
                                   {"models": ["last"], "strategies": ["mcts:ministep:16"], "budgets": [48]}]
    spec = PipelineSpec.from_dict(raw)
    assert start(store, dispatcher, spec, pipeline_id=pid) == pid
    status = drive(store, dispatcher, pid)
    assert status["status"] == "done", status
    batches = {(b.config or {})["pipeline_stage"]: b for b in store.pipeline_batches(pid)}
    assert batches["round1/search"].config["model"] == "scripted"
    assert batches["round2/search"].config["model"] == ckpt[1]  # the newest model searches
    r1 = sorted(p.index for _, p in store.batch_rows(str(batches["round1/search"].id)))
    r2 = sorted(p.index for _, p in store.batch_rows(str(batches["round2/search"].id)))
    assert (r1, r2) == ([0, 1], [2, 3])  # fresh training problems each round
    assert [c.base for c in calls] == ["scripted", ckpt[1] if train_from == "previous" else "scripted"]
    # the round's own synthesis, exported into the claim's own folder (never shared with a successor)
    assert re.search(r"round2/sft/claim-\d+/data$", calls[1].data), calls[1].data
    second = store.get_checkpoint(ckpt[2])
    assert str(second.parent_id) == (ckpt[1].removeprefix("checkpoint:") if train_from == "previous"
                                     else store.model_id_for("scripted"))  # fmt: skip
    assert [str(m.id) for m in store.lineage(ckpt[2])][:1] == [ckpt[2].removeprefix("checkpoint:")]
    for r in (1, 2):
        assert batches[f"eval/round{r}/arith-heldout"].config["model"] == ckpt[r]
    report = pipeline_report(store, pid)
    assert [(c["model_key"], c["model"], c["strategy"]) for c in report["table"]] == [
        ("base", "scripted", "greedy"), ("round1", ckpt[1], "greedy"), ("round2", ckpt[2], "greedy"),
        ("round2", ckpt[2], "mcts:ministep:16")]
    mcts = report["table"][-1]
    assert mcts["vs_trained"]["model"] == ckpt[2] and mcts["vs_base"]["model"] == "scripted"
    assert report["table"][1]["vs_trained"] is None  # a trained model's greedy row is its own reference
    assert [r["training"]["model"] for r in report["rounds"]] == [ckpt[1], ckpt[2]]
    out = Path(spec.out).resolve() / f"t-{pid[:8]}"
    assert json.loads((out / "table.json").read_text()) == report["table"]
    assert (out / "table.png").stat().st_size > 0 and "| model · strategy |" in (out / "table.md").read_text()
    store.close()


# ---------------------------------------------------------------------------------- real Celery workers
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_pipeline_end_to_end_through_celery_workers(pg_database, redis_url, tmp_path: Path) -> None:
    from marco.tasks.arith import gold_cot_rows
    from scheduler.dispatch import CeleryDispatcher
    from worker.harness import start_worker
    from worker.settings import QueueSettings

    url = pg_database()
    store = Store.open(url)
    env = {
        "MARCO_BROKER_URL": redis_url, "MARCO_DATABASE_URL": url, "MARCO_LEASE_SECONDS": "120",
        "MARCO_PRELOAD_MODELS": "smollm2", "OMP_NUM_THREADS": "2",
    }  # fmt: skip
    worker = start_worker(env, tmp_path / "logs", name="pipe", queues="reason,synthesize,train")
    try:
        dispatcher = CeleryDispatcher(QueueSettings.from_env(env))
        # Chains long enough for SmolLM2 to finish some with its own <Output> (only those become examples), but
        # the base model rarely does (0 of 48 sampled chains on arith-train at t=0.3 on one CPU), so the round
        # also trains on gold CoT (as Marco-o1-CoT did): the pipeline runs whether its synthesis kept any.
        gold = tmp_path / "gold.jsonl"
        gold.write_text("".join(json.dumps(r) + "\n" for r in gold_cot_rows("arith-train", 1000, 8)))
        search = {**TINY_SEARCH, "budget": 640, "max_answer_tokens": 384, "temperature": 0.3}
        sft = {**spec_dict(tmp_path)["sft"], "sources": [{"path": str(gold), "weight": 1.0}]}
        spec = PipelineSpec.from_dict(spec_dict(tmp_path, search=search, synthesize={"correct_only": False, "top_k": 4},
                                                train={"langs": ["en"], "start": 0, "limit": 4}, chunk=2, sft=sft))  # fmt: skip
        pid = start(store, dispatcher, spec)
        status = drive(store, dispatcher, pid, poll_s=1.0, timeout_s=780)
        assert status["status"] == "done", (status, worker.output()[-3000:])
    finally:
        worker.stop()
    report = pipeline_report(store, pid)
    stages = {s["stage"]: s for s in report["stages"]}
    batches = {name: store.get_batch(s["batch_id"]) for name, s in stages.items()}
    # every stage ran on the worker, in order
    assert all(b.status == "done" for b in batches.values())
    assert batches["round1/synthesize"].created_at >= batches["round1/search"].finished_at
    assert batches["round1/train"].created_at >= batches["round1/synthesize"].finished_at
    assert batches["eval/round1/arith-heldout"].created_at >= batches["round1/train"].finished_at
    # the fine-tuned checkpoint was evaluated on the same problems as the base model
    model = report["rounds"][0]["training"]["model"]
    assert batches["eval/round1/arith-heldout"].config["model"] == model and store.get_checkpoint(model).kind == "checkpoint"
    before = sorted((p.dataset, p.lang, p.index) for _, p in store.batch_rows(str(batches["eval/base/arith-heldout"].id)))
    after = sorted((p.dataset, p.lang, p.index) for _, p in store.batch_rows(str(batches["eval/round1/arith-heldout"].id)))
    assert before == after and len(before) == 2
    examples = store.cot_examples(report["rounds"][0]["synthesis"]["run_id"])
    training = report["rounds"][0]["training"]
    assert len(training["losses"]) == 2 and report["rounds"][0]["synthesis"]["examples"] == len(examples)
    assert {str(e.source_batch_id) for e in examples} <= {str(batches["round1/search"].id)}
    assert all(e.messages[-1]["content"].rstrip().endswith("</Output>") for e in examples)  # the model's own
    # what it trained on: the gold file, and the round's synthesis when that kept anything
    assert training["n_examples"] == 8 + len(examples) and str(gold) in training["data"]
    assert ("synthesis:" in training["data"]) == bool(examples)
    for row, stage in zip(report["table"], ("eval/base/arith-heldout", "eval/round1/arith-heldout")):
        rows = [s for s, _ in store.batch_rows(str(batches[stage].id))]
        assert row["n"] == 2 and row["tokens_spent"] == pytest.approx(sum(s.tokens for s in rows) / 2) and row["tokens_spent"] > 0
        assert row["correct"] == sum(bool(s.correct) for s in rows)
    assert report["table"][1]["vs_base"]["model"] == "smollm2"
    written = json.loads((Path(spec.out).resolve() / f"t-{pid[:8]}" / "table.json").read_text())
    assert written == report["table"]
    store.close()


def test_an_evaluation_only_pipeline_names_its_trained_reference(tmp_path: Path) -> None:
    """``rounds: 0`` with ``evaluation.trained``: a checkpoint trained outside the pipeline is the reference
    of the paired tests against the trained greedy row."""
    raw = spec_dict(tmp_path, rounds=0)
    raw["evaluation"] = {**raw["evaluation"], "trained": "checkpoint:abc",
                         "matrix": [{"models": ["base", "checkpoint:abc"], "strategies": ["greedy"], "budgets": [48]}]}
    spec = PipelineSpec.from_dict(raw)
    assert spec.evaluation.trained == "checkpoint:abc"
    assert spec.model_keys(spec.evaluation.matrix[0]) == ["base", "checkpoint:abc"]
