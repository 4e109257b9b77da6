"""`marco traces` and `marco report` against a stored batch, on SQLite and Postgres."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store
from marco.tasks.base import Problem

runner = CliRunner()


@pytest.fixture()
def batch(store: Store, db_url: str):
    problems = [Problem("mgsm", lang, i, f"What is 40 + {i}? ({lang})", ("42",)) for lang in ("en", "zh") for i in range(3)]
    configs = [SearchConfig(strategy="mcts", action="ministep:6", budget=300, children=2, seed=1),
               SearchConfig(strategy="greedy", budget=200)]
    plan = store.create_batch(problems, configs, model="scripted", task="mgsm", chunk_size=3)
    for job in plan.job_ids:
        assert execute_job(store, job, BackendCache(), "w").status == "done"
    return plan


def _cli(*args: str, db: str):
    return runner.invoke(app, [*args, "--db", db])


def test_list_filters(store: Store, db_url: str, batch) -> None:
    out = _cli("traces", "list", "--batch", batch.batch_id, "--limit", "100", db=db_url)
    assert out.exit_code == 0, out.output
    assert sum(sid in out.output for sid in batch.search_ids) == len(batch.search_ids)
    zh = _cli("traces", "list", "--batch", batch.batch_id, "--lang", "zh", "--strategy", "greedy", db=db_url)
    rows = store.find_searches(batch.batch_id, lang="zh", strategy="greedy")
    assert len(rows) == 3 and all(str(r.id) in zh.output for r in rows)
    assert "mgsm/en" not in zh.output
    for flag, want in (("--correct", True), ("--wrong", False)):
        got = store.find_searches(batch.batch_id, correct=want, limit=None)
        out = _cli("traces", "list", "--batch", batch.batch_id, flag, "--limit", "100", db=db_url)
        assert out.output.count("mgsm/") == len(got)
        assert all(r.correct is want for r in got)


def test_show_and_path(store: Store, db_url: str, batch) -> None:
    row = store.find_searches(batch.batch_id, strategy="mcts", limit=1)[0]
    out = _cli("traces", "show", str(row.id), db=db_url)
    assert out.exit_code == 0, out.output
    nodes = store.load_nodes(str(row.id))
    lines = [l for l in out.output.splitlines() if "visits=" in l]
    assert len(lines) == len(nodes)
    starred = [l for l in lines if l.startswith("*")]
    assert len(starred) == len(row.chosen_path) and all(nid in " ".join(starred) for nid in row.chosen_path)
    leaf = row.chosen_path[-1]
    path = _cli("traces", "path", leaf, db=db_url)
    assert path.exit_code == 0
    by_id = {n.id: n for n in nodes}
    assert path.output.rstrip("\n") == "".join(by_id[i].text for i in row.chosen_path).rstrip("\n")


def test_report_table_json_and_plot(store: Store, db_url: str, batch, tmp_path: Path) -> None:
    out = _cli("report", batch.batch_id, "--json", db=db_url)
    assert out.exit_code == 0, out.output
    rep = json.loads(out.output)
    labels = sorted(c.label for c in (SearchConfig(strategy="mcts", action="ministep:6", budget=300, children=2, seed=1),
                                      SearchConfig(strategy="greedy", budget=200)))
    assert rep["langs"] == ["en", "zh"] and [r["label"] for r in rep["rows"]] == labels
    for r in rep["rows"]:
        searches = store.find_searches(batch.batch_id, strategy=r["label"], limit=None)
        assert r["overall"] == pytest.approx(sum(bool(s.correct) for s in searches) / len(searches))
        assert r["tokens_per_problem"] == pytest.approx(sum(s.tokens for s in searches) / len(searches))
    png = tmp_path / "acc.png"
    text = _cli("report", batch.batch_id, "--plot", str(png), db=db_url)
    assert text.exit_code == 0 and "mcts/ministep:6/k2" in text.output and "tokens/problem" in text.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["traces", "show", "00000000-0000-0000-0000-000000000000"], ["traces", "show", "nope"],
                                  ["traces", "path", "nope"], ["traces", "tree", "nope", "--html", "x.html"],
                                  ["report", "nope"], ["traces", "list", "--batch", "nope"]])
def test_unknown_ids_exit_1_with_one_line(db_url: str, store: Store, args: list[str]) -> None:
    out = _cli(*args, db=db_url)
    assert out.exit_code == 1
    assert out.output.strip().count("\n") == 0 and out.output.startswith("error:")


def test_database_that_does_not_answer(tmp_path: Path) -> None:
    for args in (["traces", "list"], ["report", "b"], ["db", "check"], ["db", "upgrade"]):
        out = runner.invoke(app, [*args, "--db", "postgresql://nobody@127.0.0.1:1/none"])
        assert out.exit_code == 1
        assert out.output.strip().count("\n") == 0 and "does not answer" in out.output
