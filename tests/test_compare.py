"""``marco compare``: spec parsing, the interval and the paired test, and whole runs into the store."""

from __future__ import annotations

import json
import random
import re
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.compare.spec import SpecError, parse_ints, parse_strategies, parse_strategy, plan_runs
from marco.compare.stats import paired_test, sign_test_p, wilson_interval
from marco.llm.scripted import ScriptedBackend
from marco.search.base import SearchConfig
from marco.tasks import get_task

runner = CliRunner()


# ---- specs -----------------------------------------------------------------------------------------------
def test_specs_parse_into_configs() -> None:
    greedy, sc, bon8, mcts, step = parse_strategies("greedy, sc,bon:8,mcts:ministep:16/k=4/c=0.5,mcts:step+reflect")
    assert [s.name for s in (greedy, sc, bon8, mcts, step)] == [
        "greedy", "sc", "bon:8", "mcts:ministep:16/k=4/c=0.5", "mcts:step+reflect"]
    assert greedy.config(256, 3) == SearchConfig(strategy="greedy", budget=256, seed=3)
    assert sc.config(512, 1) == SearchConfig(strategy="sc", budget=512, seed=1)  # the search's own default n
    assert bon8.config(512, 0).n == 8
    cfg = mcts.config(1024, 2)
    assert (cfg.action, cfg.children, cfg.exploration, cfg.budget, cfg.seed) == ("ministep:16", 4, 0.5, 1024, 2)
    assert step.config(64, 0).reflect and step.config(64, 0).action == "step"
    assert parse_strategy("mcts").config(64, 0).action == "ministep:32"
    assert parse_strategy("sc/t=0.9/top_p=0.8").config(64, 0).temperature == 0.9
    assert parse_ints("1024, 256,512,256", "--budgets") == [256, 512, 1024]


@pytest.mark.parametrize(
    "text, message",
    [
        ("beam", "unknown strategy 'beam'"),
        ("mcts:ministep:x", "unknown action"),
        ("sc:0", "positive cap on the chains"),
        ("greedy:3", "greedy takes no argument"),
        ("sc+reflect", "+reflect is an MCTS action"),
        ("mcts/k", "/KEY=VALUE"),
        ("mcts/zz=1", "unknown setting 'zz'"),
        ("mcts/budget=9", "set by the spec, --budgets or --seeds"),
        ("mcts/k=two", "k" if False else "children='two' is not a int"),
        ("greedy,greedy", "appears twice"),
    ],
)
def test_bad_specs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_strategies(text)


def test_bad_budgets() -> None:
    with pytest.raises(SpecError, match="whole numbers"):
        parse_ints("256,lots", "--budgets")
    with pytest.raises(SpecError, match="positive"):
        parse_ints("0,256", "--budgets")


def test_plan_runs_every_strategy_budget_and_seed_with_distinct_labels() -> None:
    specs = parse_strategies("greedy,sc,mcts:ministep:32")
    runs = plan_runs(specs, [256, 512], seeds=3)
    # greedy is deterministic: one seed per budget; the others run every seed
    assert [(r.strategy, r.budget, r.seed) for r in runs if r.strategy == "greedy"] == [("greedy", 256, 0), ("greedy", 512, 0)]
    assert len([r for r in runs if r.strategy == "sc"]) == 6
    assert len(runs) == 2 + 6 + 6
    assert len({r.config.label for r in runs}) == len(runs)
    assert all(r.config.budget == r.budget and r.config.seed == r.seed for r in runs)


def test_plan_runs_refuses_configs_the_store_cannot_tell_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SearchConfig, "label", property(lambda self: self.strategy))
    with pytest.raises(SpecError, match="same search label 'sc'"):
        plan_runs(parse_strategies("sc"), [256, 512], seeds=1)


# ---- statistics, against hand-computed values -------------------------------------------------------------
def test_wilson_interval_matches_hand_computed_values() -> None:
    # 5/10: centre (0.5 + 1.92/20)/(1.384) = 0.5, half = 1.96*sqrt(0.025 + 0.0096)/1.384 = 0.2634
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    # 0/10: (0, z²/(n+z²)) = (0, 3.8415/13.8415)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    low, high = wilson_interval(1, 10)
    assert (round(low, 4), round(high, 4)) == (0.0179, 0.4042)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for n in range(1, 200):  # the interval always holds p̂, exactly at the edges (the plot draws p̂ - low)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        for k in (1, n // 3, n - 1):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_sign_test_matches_hand_computed_values() -> None:
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)  # 2 * 0.5**6
    assert sign_test_p(7, 1) == pytest.approx(2 * (1 + 8) / 256)
    assert sign_test_p(1, 7) == sign_test_p(7, 1)
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)


def test_paired_test_counts_wins_losses_and_ties() -> None:
    a = [1, 1, 1, 0, 0, 1, 0.5, 1]
    b = [0, 0, 1, 0, 1, 0, 0.0, 1]
    t = paired_test(a, b)
    assert (t.wins, t.losses, t.ties, t.problems) == (4, 1, 3, 8)
    assert t.p == pytest.approx(2 * (1 + 5) / 32)
    with pytest.raises(ValueError):
        paired_test([1], [1, 0])


# ---- a whole compare run, scripted model, into SQLite -----------------------------------------------------
class ArithBackend(ScriptedBackend):
    """A scripted model that knows which arith problem it is answering (the plain responder sees only the
    assistant turn): right with a probability that depends on the problem, wrong (+1) otherwise."""

    def __init__(self) -> None:
        self.prompt = ""
        super().__init__(arith_responder(lambda: self.prompt))

    def _one(self, req, sample):  # type: ignore[no-untyped-def]
        self.prompt = self.decode(req.prompt_ids)
        return super()._one(req, sample)


def arith_responder(prompt):  # type: ignore[no-untyped-def]
    answers = {p.question: int(p.references[0]) for p in get_task("arith").load(None, None, 40)}

    def respond(prefix: str, rng: random.Random) -> str:
        question = next(q for q in answers if q in prompt())
        if "<Output>" in prefix:
            return ""
        if "</Thought>" in prefix:
            return "\n<Output>0</Output>"
        right = answers[question]
        chance = 0.2 + 0.6 * (right % 3) / 2
        answer = right if rng.random() < chance else right + 1
        steps = "".join(f"Step {k}: work it out.\n\n" for k in range(rng.randint(0, 2)))
        return f"{steps}So the answer is {answer}.\n</Thought>\n<Output>{answer}</Output>"

    return respond


def stored(db: Path) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute(
        "select problem_id, label, config, status, correct, tokens, tree_depth, path_depth from searches")]
    con.close()
    for r in rows:
        r["config"] = json.loads(r["config"])
    return rows


def test_compare_end_to_end_table_matches_the_stored_searches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import marco.cli.db

    monkeypatch.setattr(marco.cli.db, "load_model", lambda spec, store: ArithBackend())
    db = tmp_path / "cmp.db"
    plot, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    args = ["compare", "--dataset", "arith", "--limit", "12", "--strategies", "greedy,sc,bon,mcts:ministep:32",
            "--budgets", "128,512", "--seeds", "2", "--model", "scripted", "--chunk", "5",
            "--db", f"sqlite:///{db}", "--plot", str(plot), "--markdown", str(md)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"
    rows = stored(db)
    # one batch: 12 problems × (greedy 2 budgets + 3 strategies × 2 budgets × 2 seeds)
    assert len(rows) == 12 * (2 + 12) and all(r["status"] == "done" for r in rows)
    labels = {r["label"] for r in rows}
    assert len(labels) == 14

    from marco.compare.table import build_comparison
    from marco.store import Store

    store = Store.open(f"sqlite:///{db}")
    comp = build_comparison(store, store.batches(1)[0].id)
    kind = {"greedy": "greedy", "sc": "sc", "bon": "bon", "mcts:ministep:32": "mcts"}
    for row in comp.rows:
        mine = [r for r in rows if r["config"]["strategy"] == kind[row.strategy] and r["config"]["budget"] == row.budget]
        assert len({r["config"]["seed"] for r in mine}) == row.seeds == (1 if row.strategy == "greedy" else 2)
        assert row.problems == 12
        # accuracy and spent tokens straight from the stored searches
        assert row.accuracy == pytest.approx(sum(bool(r["correct"]) for r in mine) / len(mine))
        assert row.tokens_per_problem == pytest.approx(sum(r["tokens"] for r in mine) / len(mine))
        assert row.tokens_per_problem <= row.budget
        assert row.low <= row.accuracy <= row.high
        # depth (issue 15): the mean over the stored searches of the tree's and the chosen path's depth
        assert row.tree_depth == pytest.approx(sum(r["tree_depth"] for r in mine) / len(mine))
        assert row.path_depth == pytest.approx(sum(r["path_depth"] for r in mine) / len(mine))
        assert 1 <= row.path_depth <= row.tree_depth
        if row.strategy != "mcts:ministep:32":
            assert row.tree_depth == 1  # a chain is one answer node under the root
        # the printed table and the markdown carry the same numbers
        line = next(l for l in md.read_text().splitlines() if l.startswith(f"| {row.strategy} | {row.budget} |"))
        assert f"| {100 * row.accuracy:.1f} |" in line and f"| {row.tokens_per_problem:.0f} |" in line
        assert f"| {row.tree_depth:.1f} / {row.path_depth:.1f} |" in line
        assert re.search(rf"{re.escape(row.strategy)}\s+│\s+{row.budget}\s+│.*{100 * row.accuracy:.1f}", result.output)
    # paired tests: recount wins/losses of each strategy against greedy at the same budget from the rows
    assert {(p.strategy, p.budget) for p in comp.paired} == {(s, b) for s in ("sc", "bon", "mcts:ministep:32") for b in (128, 512)}
    for p in comp.paired:
        base = {r["problem_id"]: bool(r["correct"]) for r in rows
                if r["config"]["strategy"] == "greedy" and r["config"]["budget"] == p.budget}
        mine: dict[str, list[bool]] = {}
        for r in rows:
            if r["config"]["strategy"] == kind[p.strategy] and r["config"]["budget"] == p.budget:
                mine.setdefault(r["problem_id"], []).append(bool(r["correct"]))
        score = {pid: sum(v) / len(v) for pid, v in mine.items()}
        assert p.test.wins == sum(score[pid] > base[pid] for pid in base)
        assert p.test.losses == sum(score[pid] < base[pid] for pid in base)
        assert p.test.p == pytest.approx(sign_test_p(p.test.wins, p.test.losses))
    assert any(p.test.wins + p.test.losses for p in comp.paired)  # the responder makes strategies differ
    assert comp.row("mcts:ministep:32", 512).tree_depth > 1  # the tree grew below the root

    # `marco report BATCH` shows the same comparison
    rep = runner.invoke(app, ["report", comp.batch_id, "--db", f"sqlite:///{db}", "--json"])
    assert rep.exit_code == 0, rep.output
    again = json.loads(rep.output)
    assert [(r["strategy"], r["budget"], r["accuracy"]) for r in again["rows"]] == [
        (r.strategy, r.budget, r.accuracy) for r in comp.rows]
    text = runner.invoke(app, ["report", comp.batch_id, "--db", f"sqlite:///{db}", "--baseline", "sc",
                                "--markdown", str(tmp_path / "again.md")], env={"COLUMNS": "200"})
    assert text.exit_code == 0 and "paired against sc" in text.output
    assert "| vs sc@ |" in (tmp_path / "again.md").read_text()
    wrong = runner.invoke(app, ["report", comp.batch_id, "--db", f"sqlite:///{db}", "--baseline", "sc/t=0.3"])
    assert wrong.exit_code == 1 and "not a strategy of this batch" in wrong.output and "bon" in wrong.output


def test_compare_errors_before_loading_anything(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    bad = runner.invoke(app, ["compare", "--strategies", "greedy,beam", "--db", db])
    assert bad.exit_code == 1 and "unknown strategy 'beam'" in bad.output
    bad = runner.invoke(app, ["compare", "--strategies", "sc,bon", "--db", db])
    assert bad.exit_code == 1 and "--baseline 'greedy' is not one of --strategies" in bad.output
    bad = runner.invoke(app, ["compare", "--dataset", "translation", "--db", db])
    assert bad.exit_code == 1 and "right or wrong" in bad.output
    bad = runner.invoke(app, ["compare", "--queue", "--model", "scripted", "--limit", "2", "--db", db],
                        env={"MARCO_BROKER_URL": ""})
    assert bad.exit_code == 1 and "--queue needs a broker" in bad.output
    assert not (tmp_path / "x.db").exists() or not stored(tmp_path / "x.db")


# ---- arith: the tuning set --------------------------------------------------------------------------------
def test_arith_is_deterministic_and_its_splits_do_not_overlap() -> None:
    tune, held = get_task("arith"), get_task("arith-heldout")
    a, b = tune.load(None, None, 200), tune.load(None, ["en"], 200)
    assert [p.question for p in a] == [p.question for p in b] and len(a) == 200
    h = held.load(None, None, 200)
    assert {p.dataset for p in h} == {"arith-heldout"}
    assert len({p.question for p in a} & {p.question for p in h}) < 10  # a few short ones may coincide by chance
    assert {p.meta["template"] for p in a[:6]} == {"add", "sub", "mul", "div", "add_sub", "mul_add"}
    for p in a + h:
        assert p.references[0].lstrip("-").isdigit() and int(p.references[0]) >= 0
    assert tune.score(a[0].references[0], a[0]).correct
    assert tune.extract("so <Output>13</Output>", a[0]) == "13"
    with pytest.raises(ValueError, match="English only"):
        tune.load(None, ["zh"], 3)


@pytest.mark.slow
def test_compare_on_the_real_model(smollm2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny real compare: SmolLM2, 2 arith problems, greedy / sc / MCTS at one small budget."""
    import marco.cli.db

    monkeypatch.setattr(marco.cli.db, "load_model", lambda spec, store: smollm2)
    db = tmp_path / "real.db"
    result = runner.invoke(app, [
        "compare", "--dataset", "arith", "--limit", "2", "--strategies", "greedy,sc,mcts:ministep:16",
        "--budgets", "96", "--db", f"sqlite:///{db}", "--plot", str(tmp_path / "real.png"),
    ], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = stored(db)
    assert len(rows) == 2 * 3 and all(r["status"] == "done" for r in rows)
    assert all(0 < r["tokens"] <= 96 for r in rows)  # every strategy spends, none beyond its budget
    from marco.compare.table import build_comparison
    from marco.store import Store

    store = Store.open(f"sqlite:///{db}")
    comp = build_comparison(store, store.batches(1)[0].id)
    assert [(r.strategy, r.budget, r.problems) for r in comp.rows] == [
        ("greedy", 96, 2), ("sc", 96, 2), ("mcts:ministep:16", 96, 2)]
    for row in comp.rows:
        assert row.tokens_per_problem == pytest.approx(
            sum(r["tokens"] for r in rows if r["config"]["strategy"] == row.strategy.split(":")[0]) / 2)
        assert row.wall_s > 0
    assert len(comp.paired) == 2 and (tmp_path / "real.png").exists()
    assert "paired against greedy" in result.output


def test_pool_compare_pools_replicate_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/pool_compare.py: two single-seed batches of the same problems pooled problem by problem."""
    import subprocess
    import sys

    import marco.cli.db
    from marco.compare.table import build_comparison
    from marco.store import Store

    monkeypatch.setattr(marco.cli.db, "load_model", lambda spec, store: ArithBackend())
    comps = []
    for name in ("a", "b"):
        db = tmp_path / f"{name}.db"
        args = ["compare", "--dataset", "arith", "--limit", "10", "--strategies", "greedy,sc,mcts:ministep:32",
                "--budgets", "256", "--model", "scripted", "--db", f"sqlite:///{db}"]
        assert runner.invoke(app, args).exit_code == 0
        store = Store.open(f"sqlite:///{db}")
        comps.append(build_comparison(store, store.batches(1)[0].id))
    out = tmp_path / "pooled.md"
    script = Path(__file__).resolve().parents[1] / "scripts" / "pool_compare.py"
    done = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}",
                           "--pair", "mcts:ministep:32:sc", "--markdown", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = out.read_text()
    for strategy in ("greedy", "sc", "mcts:ministep:32"):
        a, b = (c.row(strategy, 256) for c in comps)
        assert a is not None and b is not None
        line = next(l for l in table.splitlines() if l.startswith(f"| {strategy} | 256 | 2 | 10 |"))
        assert f"| {100 * (a.accuracy + b.accuracy) / 2:.1f} |" in line
        assert f"| {(a.tokens_per_problem + b.tokens_per_problem) / 2:.0f} |" in line
    # the paired test recounted from the two batches' per-problem scores (problems matched by index)
    pooled: dict[str, dict[int, list[float]]] = {s: {} for s in ("sc", "mcts:ministep:32")}
    for c, name in zip(comps, ("a", "b")):
        con = sqlite3.connect(tmp_path / f"{name}.db")
        index = dict(con.execute('select id, "index" from problems'))
        con.close()
        for s in pooled:
            for pid, v in c.row(s, 256).scores.items():
                pooled[s].setdefault(index[pid], []).append(v)
    m = {s: {i: sum(v) / 2 for i, v in d.items()} for s, d in pooled.items()}
    wins = sum(m["mcts:ministep:32"][i] > m["sc"][i] for i in m["sc"])
    losses = sum(m["mcts:ministep:32"][i] < m["sc"][i] for i in m["sc"])
    assert f"| mcts:ministep:32 | sc | 256 | {wins} | {losses} |" in table
