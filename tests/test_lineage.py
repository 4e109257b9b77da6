"""SFT on a stored synthesis run: the training run, the checkpoint's lineage, and `--model checkpoint:ID`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store, StoreError
from marco.synthesis import SynthesisConfig, plan_synthesis
from marco.tasks.base import Problem

runner = CliRunner()


def _synthesis_run(store: Store, name: str) -> tuple[str, str]:
    """Two scripted searches → a synthesis run of their two chosen paths; returns (reason batch, run id)."""
    problems = [Problem("mgsm", "en", i, f"Anna has {i} bags of 42 apples; she keeps one bag. How many?", ("42",))
                for i in range(2)]  # fmt: skip
    config = SearchConfig(strategy="mcts", action="ministep:8", budget=120, children=2, seed=7)
    plan = store.create_batch(problems, [config], model="scripted", task="mgsm", chunk_size=2, name=name)
    assert execute_job(store, plan.job_ids[0], BackendCache(), worker="t").status == "done"
    run_id, job = plan_synthesis(store, SynthesisConfig(batches=[plan.batch_id]), name=f"{name}-cot")
    assert execute_job(store, job, BackendCache(), worker="t").status == "done"
    return plan.batch_id, run_id


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sft_on_a_synthesis_run_registers_a_checkpoint_with_lineage(db_url: str, store: Store, tmp_path: Path) -> None:
    import uuid

    nproc = 2 if store.dialect == "postgresql" else 1  # torchrun with 2 gloo ranks on Postgres; in-process on SQLite
    name = f"lineage-{uuid.uuid4().hex[:6]}"
    reason_batch, run_id = _synthesis_run(store, name)
    out = tmp_path / "ckpt"
    res = runner.invoke(app, [
        "sft", "--data", f"synthesis:{name}", "--base", "smollm2", "--nproc", str(nproc), "--max-steps", "4",
        "--batch-size", "1", "--max-length", "256", "--lr", "2e-4", "--out", str(out), "--db", db_url,
        "--in-process", "--json",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    losses = payload["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert payload["metrics"]["world_size"] == nproc
    claim_dir = out / "claim-1"  # each claim of the train job writes a folder of its own (issue 17)
    if nproc == 2:
        assert (claim_dir / "train.log").exists()  # launched through torchrun

    # the training run row: base, data, hyperparameters, loss per step, metrics, checkpoint, status
    train = store.get_training_run(payload["training_run"])
    assert train.status == "done" and train.losses == losses and train.metrics["steps"] == 4
    assert train.data == f"synthesis:{run_id}" and train.synthesis_id == run_id and train.n_examples == 2
    assert train.hyperparameters["nproc"] == nproc and train.hyperparameters["max_steps"] == 4
    assert Path(train.checkpoint) == claim_dir.resolve() and (claim_dir / "config.json").exists()
    assert train.base == "smollm2" and train.base_model_id == store.ensure_model("smollm2")

    # the checkpoint in `models`, with its lineage back to the base model and the synthesised data
    model = store.get_checkpoint(payload["model"])
    assert model.kind == "checkpoint" and model.spec == payload["model"] and model.path == train.checkpoint
    assert model.parent_id == train.base_model_id and str(train.output_model_id) == str(model.id)
    assert model.meta["dataset"] == f"synthesis:{run_id}" and model.meta["training_run_id"] == str(train.id)
    assert model.meta["hyperparameters"]["max_steps"] == 4
    assert [m.kind for m in store.lineage(payload["model"])] == ["checkpoint", "base"]
    assert store.get_checkpoint(str(train.id)[:8]).id == model.id  # a training run id prefix names it too
    examples = store.cot_examples(run_id)
    assert {str(e.source_batch_id) for e in examples} == {reason_batch}  # data → trees, back to the searches

    # the checkpoint answers through `marco solve --model checkpoint:ID`, and the search records that model
    res = runner.invoke(app, ["solve", "What is 2 + 3?", "--model", payload["model"], "--strategy", "greedy",
                              "--budget", "24", "--db", db_url, "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert answer["tokens"] > 0 and answer["path"]
    assert str(store.get_search(answer["search_id"]).model_id) == str(model.id)

    # a checkpoint as a base (its lineage continues), and bad checkpoints fail in one line
    missing = runner.invoke(app, ["solve", "x", "--model", "checkpoint:00000000-0000-0000-0000-000000000000", "--db", db_url])
    assert missing.exit_code == 1 and "no checkpoint" in missing.stderr and missing.stderr.count("\n") == 1
    with pytest.raises(StoreError, match="no checkpoint"):
        store.checkpoint_path("nothing-like-it")


def test_sft_cli_refuses_unknown_synthesis_runs(db_url: str, store: Store, tmp_path: Path) -> None:
    res = runner.invoke(app, ["sft", "--data", "synthesis:nope", "--out", str(tmp_path / "o"), "--db", db_url, "--in-process"])
    assert res.exit_code == 1 and "no synthesis run 'nope'" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_queued_sft_without_a_broker_exits_1(db_url: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MARCO_BROKER_URL", raising=False)
    res = runner.invoke(app, ["sft", "--data", str(tmp_path / "x.jsonl"), "--queue", "--db", db_url])
    assert res.exit_code == 1 and "MARCO_BROKER_URL" in res.stderr


def test_load_backend_resolves_checkpoints_through_the_store(tmp_path: Path) -> None:
    from marco.llm import checkpoint_resolver, resolve_checkpoint

    seen = []
    with checkpoint_resolver(lambda ref: seen.append(ref) or str(tmp_path)):
        assert resolve_checkpoint("checkpoint:abc123") == str(tmp_path)
    assert seen == ["abc123"]
    store = Store.open(f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(StoreError, match="no checkpoint"):
        store.checkpoint_path("checkpoint:abcdef")
    os.environ.pop("MARCO_DATABASE_URL", None)
    store.close()
