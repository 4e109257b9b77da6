"""Pipelines: the spec file, stage chaining by the scheduler, a failed stage and its resume, and a small
pipeline end to end through real Celery workers (real Redis, Postgres and SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.llm.base import Backend, Generation, GenerationRequest
from marco.llm.scripted import ScriptedBackend
from marco.pipeline import PipelineSpec
from marco.pipeline.report import pipeline_report, pipeline_status
from marco.pipeline.service import drive, resume, start
from marco.store import Store

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = {"strategy": "mcts", "action": "ministep:16", "budget": 48, "children": 2, "max_depth": 3,
               "max_answer_tokens": 24, "seed": 1}  # fmt: skip


def spec_dict(tmp_path: Path, **over) -> dict:
    base = {
        "name": "t", "model": "smollm2", "task": "mgsm",
        "train": {"langs": ["en"], "start": 0, "limit": 2}, "test": {"langs": ["en"], "start": 2, "limit": 2},
        "search": TINY_SEARCH, "chunk": 2, "synthesize": {},
        "sft": {"max_steps": 2, "batch_size": 1, "max_length": 256, "learning_rate": 1e-4, "nproc": 1},
        "out": str(tmp_path / "pipelines"),
    }  # fmt: skip
    return {**base, **over}


def test_example_file_and_spec_validation(tmp_path: Path) -> None:
    spec = PipelineSpec.from_yaml(ROOT / "examples" / "pipeline.yaml")
    assert spec.search_config().strategy == "mcts" and spec.sft_config("d", spec.model, "o").nproc == 2
    for bad, message in (
        ({"epochs_x": 1}, "unknown pipeline key"),
        ({"search": {"strategy": "beam"}}, "search: unknown strategy"),
        ({"sft": {"data": "x"}}, "set by the pipeline"),
        ({"synthesize": {"top_k": 0}}, "--top-k"),
        ({"name": ""}, "needs a name"),
    ):
        with pytest.raises(ValueError, match=message):
            PipelineSpec.from_dict(spec_dict(tmp_path, **bad))
    (tmp_path / "p.yaml").write_text("name: [unclosed")
    res = runner.invoke(app, ["pipeline", "run", str(tmp_path / "p.yaml"), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 1 and "not valid YAML" in res.stderr and res.stderr.count("\n") == 1
    res = runner.invoke(app, ["pipeline", "status", "00000000-0000-0000-0000-000000000000", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert res.exit_code == 1 and "no pipeline" in res.stderr


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


def test_failed_stage_stops_the_pipeline_with_its_reason_and_resume_continues(tmp_path: Path, monkeypatch) -> None:
    """In-process: the scheduler's ticks chain train_reason → synthesize → train. The first stage fails
    (its backend dies), resume re-runs it; the pipeline then stops at `train` (a scripted model is not
    trainable), with that reason."""
    from scheduler.dispatch import InlineDispatcher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = Store.open(f"sqlite:///{tmp_path / 'p.db'}")
    dispatcher = InlineDispatcher(store=store)
    dispatcher.runtime._backends = None
    dispatcher.runtime.backends.put("scripted", Crashing(ScriptedBackend()))
    spec = PipelineSpec.from_dict(spec_dict(tmp_path, model="scripted", search={**TINY_SEARCH, "budget": 200}))
    pid = start(store, dispatcher, spec)
    status = drive(store, dispatcher, pid)
    assert status["status"] == "failed" and status["failed_stage"] == "train_reason"
    assert "device lost" in status["error"]
    assert [s["status"] for s in status["stages"]][2:] == ["pending", "pending", "pending"]  # nothing started after it

    dispatcher.runtime.backends.put("scripted", ScriptedBackend())
    requeued = resume(store, dispatcher, pid)
    assert requeued
    status = drive(store, dispatcher, pid)
    stages = {s["stage"]: s for s in status["stages"]}
    assert stages["train_reason"]["status"] == "done" and stages["synthesize"]["status"] == "done"
    assert stages["train"]["status"] == "failed" and status["failed_stage"] == "train"
    assert stages["test_after"]["status"] == "pending"
    # the synthesis stage took the chosen path of each train-split search
    run_id = stages["synthesize"]["batch_id"]
    assert len(store.cot_examples(run_id)) == 2
    assert {str(e.source_batch_id) for e in store.cot_examples(run_id)} == {stages["train_reason"]["batch_id"]}
    res = runner.invoke(app, ["pipeline", "status", pid, "--json", "--db", f"sqlite:///{tmp_path / 'p.db'}"])
    assert res.exit_code == 0 and json.loads(res.stdout)["failed_stage"] == "train"
    store.close()


# ---------------------------------------------------------------------------------- real Celery workers
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_small_pipeline_end_to_end_through_celery_workers(pg_database, redis_url, tmp_path: Path) -> None:
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
        spec = PipelineSpec.from_dict(spec_dict(tmp_path))
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
    assert batches["synthesize"].created_at >= batches["train_reason"].finished_at
    assert batches["train"].created_at >= batches["synthesize"].finished_at
    assert batches["test_after"].created_at >= batches["train"].finished_at
    # the fine-tuned checkpoint was searched over the same test problems as the base model
    model = report["training"]["model"]
    assert batches["test_after"].config["model"] == model and store.get_checkpoint(model).kind == "checkpoint"
    before = sorted((p.dataset, p.lang, p.index) for _, p in store.batch_rows(str(batches["test_before"].id)))
    after = sorted((p.dataset, p.lang, p.index) for _, p in store.batch_rows(str(batches["test_after"].id)))
    assert before == after and len(before) == 2
    examples = store.cot_examples(report["synthesis"]["run_id"])
    assert len(report["training"]["losses"]) == 2 and report["synthesis"]["examples"] == len(examples) >= 1
    assert {str(e.source_batch_id) for e in examples} == {str(batches["train_reason"].id)}
    for key, stage in (("before", "test_before"), ("after", "test_after")):
        m, rows = report[key], [s for s, _ in store.batch_rows(str(batches[stage].id))]
        assert m["done"] == 2 and m["tokens"] == sum(s.tokens for s in rows) > 0
        assert m["accuracy"] == pytest.approx(sum(bool(s.correct) for s in rows) / 2)
        confs = [s.confidence for s in rows if s.confidence is not None]  # None: no search reached an answer
        assert m["mean_confidence"] == (pytest.approx(sum(confs) / len(confs)) if confs else None)
    assert report["delta"]["tokens_per_problem"] == pytest.approx(
        report["after"]["tokens_per_problem"] - report["before"]["tokens_per_problem"])
    written = json.loads((Path(spec.out).resolve() / f"t-{pid[:8]}" / "report.json").read_text())
    assert written["after"] == report["after"]
    store.close()
