"""The evaluation matrix: `marco pipeline run CONFIG --json FILE` with stored batches from the scripted
backend (every number checked against the store's searches and nodes), and a tiny matrix in-process with
the real SmolLM2."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from marco.cli import app
from marco.compare.stats import sign_test_p, wilson_interval
from marco.pipeline.stages import stage_batch_id
from marco.store import Store

runner = CliRunner()
ROW_KEYS = {"model", "strategy", "dataset", "lang", "budget", "n", "correct", "accuracy", "ci_low", "ci_high",
            "tokens_spent", "mean_depth", "vs_base", "vs_trained"}  # fmt: skip


def matrix_file(tmp_path: Path, model: str, datasets: list, strategies: list, budgets: list,
                matched: list | None = None) -> Path:
    blocks = [{"models": ["base"], "strategies": strategies, "budgets": budgets}]
    if matched:
        blocks.append({"models": ["base"], "strategies": matched, "budgets": budgets, "match": strategies[1]})
    raw = {"name": "m", "model": model, "rounds": 0, "chunk": 4, "out": str(tmp_path / "runs"),
           "evaluation": {"datasets": datasets, "search": {"max_answer_tokens": 32, "children": 2},
                          "matrix": blocks}}  # fmt: skip
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def expected_cells(store: Store, pipeline_id: str) -> dict:
    """(strategy, budget, dataset, lang) -> correct, n, tokens, depths and per-problem scores, straight from
    the stored searches and nodes (not through marco.compare)."""
    from sqlalchemy import select

    from marco.store.models import NodeRow

    out: dict = defaultdict(lambda: {"scores": {}, "tokens": [], "depths": []})
    for b in store.pipeline_batches(pipeline_id):
        runs = b.config["compare"]["runs"]
        for s, p in store.batch_rows(str(b.id)):
            assert s.status == "done"
            cell = out[(runs[s.label]["strategy"], runs[s.label]["budget"], p.dataset, p.lang)]
            cell["scores"][(p.dataset, p.lang, p.index)] = 1.0 if s.correct else 0.0
            cell["tokens"].append(s.tokens)
            if s.strategy == "mcts":
                with store.sessions() as sess:
                    cell["depths"].append(max(sess.scalars(select(NodeRow.depth).where(NodeRow.search_id == s.id))))
    return out


def test_pipeline_run_writes_the_table_as_json_markdown_and_plot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = f"sqlite:///{tmp_path / 'm.db'}"
    path = matrix_file(tmp_path, "scripted", [{"dataset": "arith-heldout", "limit": 3},
                                              {"dataset": "mgsm", "langs": ["en", "zh"], "limit": 2}],
                       ["greedy", "mcts:ministep:16", "sc"], [48, 96], matched=["bon"])  # fmt: skip
    out = tmp_path / "table.json"
    res = runner.invoke(app, ["pipeline", "run", str(path), "--in-process", "--json", str(out), "--markdown",
                              str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png"), "--db", db])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and all(ROW_KEYS <= set(r) for r in rows)
    # one row per strategy and budget, one column per dataset and language
    assert len(rows) == 4 * 2 * 3
    assert {(r["dataset"], r["lang"]) for r in rows} == {("arith-heldout", "en"), ("mgsm", "en"), ("mgsm", "zh")}
    assert [(r["strategy"], r["budget"]) for r in rows if r["dataset"] == "mgsm" and r["lang"] == "zh"] == [
        ("greedy", 48), ("greedy", 96), ("mcts:ministep:16", 48), ("mcts:ministep:16", 96), ("sc", 48), ("sc", 96),
        ("bon", 48), ("bon", 96)]

    store = Store.open(db)
    pid = next(b.config["pipeline_id"] for b in store.batches())
    expected = expected_cells(store, pid)
    for r in rows:
        e = expected[(r["strategy"], r["budget"], r["dataset"], r["lang"])]
        correct = sum(e["scores"].values())
        assert r["model"] == "scripted" and r["n"] == len(e["scores"]) and r["correct"] == correct
        assert r["accuracy"] == pytest.approx(correct / r["n"])
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(correct, r["n"]))
        assert r["tokens_spent"] == pytest.approx(sum(e["tokens"]) / len(e["tokens"])) and r["tokens_spent"] > 0
        if r["strategy"].startswith("mcts"):
            assert r["mean_depth"] == pytest.approx(sum(e["depths"]) / len(e["depths"])) and r["mean_depth"] >= 1
        else:
            assert r["mean_depth"] is None
        base = expected[("greedy", r["budget"], r["dataset"], r["lang"])]["scores"]
        if r["strategy"] == "greedy":
            assert r["vs_base"] is None  # the reference row itself
        else:
            wins = sum(1 for k, v in e["scores"].items() if v > base[k])
            losses = sum(1 for k, v in e["scores"].items() if v < base[k])
            assert (r["vs_base"]["wins"], r["vs_base"]["losses"], r["vs_base"]["budget"]) == (wins, losses, r["budget"])
            assert r["vs_base"]["p"] == pytest.approx(sign_test_p(wins, losses))
        assert r["vs_trained"] is None  # no trained model in an evaluate-only pipeline
        if r["strategy"] == "bon":  # run at the tokens MCTS spent per problem on this dataset (all languages)
            spent = [t for (st, b, d, _), c in expected.items() if (st, b, d) == ("mcts:ministep:16", r["budget"], r["dataset"])
                     for t in c["tokens"]]  # fmt: skip
            assert r["matched_to"] == "mcts:ministep:16" and r["search_budget"] == math.ceil(sum(spent) / len(spent))
            assert r["tokens_spent"] <= r["search_budget"]
        else:
            assert r["matched_to"] is None and r["search_budget"] == r["budget"]
    matched = [b for b in store.batches() if b.config["pipeline_stage"].endswith("/matched")]
    assert len(matched) == 2
    for b in matched:  # planned once the MCTS cells were done
        before = store.get_batch(stage_batch_id(pid, b.config["pipeline_stage"].removesuffix("/matched")))
        assert before.status == "done" and b.started_at >= before.finished_at  # (created_at: whole seconds on SQLite)
    for b in matched:
        budgets = {r["search_budget"] for r in rows if r["strategy"] == "bon" and r["dataset"] == b.dataset}
        assert {s.config["budget"] for s, _ in store.batch_rows(str(b.id))} == budgets
    md = (tmp_path / "t.md").read_text()
    assert "| model · strategy | budget | arith-heldout en | mgsm en | mgsm zh |" in md
    assert md.count("| base (scripted) · ") == 2 * 8  # the accuracy table and the paired table
    assert "| base (scripted) · bon at mcts:ministep:16's tokens | 48 |" in md
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    # `status` shows the same table again, from the store
    res = runner.invoke(app, ["pipeline", "status", pid, "--json", "--db", db])
    assert json.loads(res.stdout)["table"] == rows
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_matrix_in_process_with_the_real_model(tmp_path: Path, monkeypatch) -> None:
    """SmolLM2-135M over arith-heldout and MGSM-zh, greedy and MCTS: every cell counted from the store."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    db = f"sqlite:///{tmp_path / 'm.db'}"
    path = matrix_file(tmp_path, "smollm2", [{"dataset": "arith-heldout", "limit": 2},
                                             {"dataset": "mgsm", "langs": ["zh"], "limit": 1}],
                       ["greedy", "mcts:ministep:32"], [96])  # fmt: skip
    t0 = time.perf_counter()
    res = runner.invoke(app, ["pipeline", "run", str(path), "--in-process", "--json", str(tmp_path / "t.json"), "--db", db])
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [(r["strategy"], r["dataset"], r["lang"], r["n"]) for r in rows] == [
        ("greedy", "arith-heldout", "en", 2), ("mcts:ministep:32", "arith-heldout", "en", 2),
        ("greedy", "mgsm", "zh", 1), ("mcts:ministep:32", "mgsm", "zh", 1)]
    store = Store.open(db)
    pid = next(b.config["pipeline_id"] for b in store.batches())
    expected = expected_cells(store, pid)
    for r in rows:
        e = expected[(r["strategy"], r["budget"], r["dataset"], r["lang"])]
        assert r["correct"] == sum(e["scores"].values()) and 0 < r["tokens_spent"] <= 96
        assert r["tokens_spent"] == pytest.approx(sum(e["tokens"]) / len(e["tokens"]))
    assert rows[1]["mean_depth"] == pytest.approx(sum(expected[("mcts:ministep:32", 96, "arith-heldout", "en")]["depths"]) / 2)
    print(f"tiny matrix: {wall:.1f}s")
    store.close()
