"""`marco ui`: the explorer's JSON API and pages over a real stored batch (SQLite and Postgres), its token
gate over real HTTP (uvicorn), and that it cannot write."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import pytest
from sqlalchemy import text
from starlette.testclient import TestClient
from typer.testing import CliRunner

from marco.cli import app as cli
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store
from marco.tasks.base import Problem
from marco.ui.app import UISettings, create_app

CONFIGS = [SearchConfig(strategy="mcts", action="step", reflect=True, budget=600, children=2, seed=1),
           SearchConfig(strategy="greedy", budget=200)]
QUESTIONS = ["What is 40 + 2?", "Ducks: 21 + 21 = ?", "Combien font 6 x 7 ?", "Quelle est la réponse ? 50 - 8",
             "What is 84 / 2? <b>bold</b>", "Sieben? (the reference is 7)"]


def stored_batch(store: Store, configs=CONFIGS, model: str = "scripted", questions=QUESTIONS) -> Any:
    """A batch executed by the real job runner (``execute_job``), in two languages."""
    # the scripted model answers 42 (sometimes 41): the last problem's reference makes sure some are wrong
    problems = [Problem("mgsm", "en" if i % 2 == 0 else "fr", i, q, ("7" if i == len(questions) - 1 else "42",))
                for i, q in enumerate(questions)]
    plan = store.create_batch(problems, configs, model=model, task="mgsm", chunk_size=3, name=f"ui-{time.time_ns()}")
    backends = BackendCache()
    for job in plan.job_ids:
        assert execute_job(store, job, backends, "test-worker").status == "done"
    return plan


@pytest.fixture()
def explorer(store: Store, db_url: str) -> Iterator[tuple[TestClient, Store, Any]]:
    plan = stored_batch(store)
    with TestClient(create_app(UISettings(db=db_url)), base_url="http://localhost") as client:
        yield client, store, plan


def test_batches_show_progress_and_accuracy(explorer) -> None:
    client, store, plan = explorer
    rows = store.find_searches(plan.batch_id, limit=None)
    got = client.get("/api/batches").json()["batches"]
    b = next(b for b in got if b["id"] == plan.batch_id)
    scored = [r for r in rows if r.correct is not None]
    assert b["progress"] == 1.0 and b["done"] == len(rows) == len(QUESTIONS) * len(CONFIGS)
    assert b["correct"] == sum(r.correct for r in scored) and b["accuracy"] == pytest.approx(b["correct"] / len(scored))
    assert {g["label"]: g["searches"] for g in b["labels"]} == {c.label: len(QUESTIONS) for c in CONFIGS}
    one = client.get(f"/api/batches/{plan.batch_id}").json()
    groups = {(g["label"], g["lang"]): g for g in one["groups"]}
    assert set(groups) == {(c.label, lang) for c in CONFIGS for lang in ("en", "fr")}
    for (label, lang), g in groups.items():
        mine = [r for r in rows if r.label == label and r.lang == lang]
        assert g["searches"] == len(mine) and g["correct"] == sum(bool(r.correct) for r in mine)
        assert g["tokens"] == sum(r.tokens for r in mine)
    report = client.get(f"/api/batches/{plan.batch_id}/report").json()
    assert {r["label"] for r in report["rows"]} == {c.label for c in CONFIGS}
    png = client.get(f"/batch/{plan.batch_id}/plot.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # a batch name resolves too, and the page shows the plot
    page = client.get(f"/batch/{one['name']}")
    assert page.status_code == 200 and f"/batch/{plan.batch_id}/plot.png" in page.text


def test_search_filters_and_pages(explorer) -> None:
    client, store, plan = explorer
    rows = store.find_searches(plan.batch_id, limit=None)

    def ids(**params: Any) -> set[str]:
        r = client.get("/api/searches", params={"batch": plan.batch_id, "per_page": 200, **params})
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()["searches"]}

    assert ids() == {str(r.id) for r in rows}
    assert ids(strategy="greedy") == {str(r.id) for r in rows if r.strategy == "greedy"}
    assert ids(strategy=CONFIGS[0].label) == {str(r.id) for r in rows if r.label == CONFIGS[0].label}
    assert ids(lang="fr") == {str(r.id) for r in rows if r.lang == "fr"}
    right, wrong = ids(correct="yes"), ids(correct="no")
    assert right == {str(r.id) for r in rows if r.correct} and wrong == {str(r.id) for r in rows if r.correct is False}
    assert right and wrong  # the scripted model answers 41 sometimes: both lists are non-empty
    confs = sorted(r.confidence for r in rows)
    lo, hi = confs[2], confs[-3]
    assert ids(conf_min=lo, conf_max=hi) == {str(r.id) for r in rows if lo <= r.confidence <= hi}
    assert len(ids(text="combien")) == len(CONFIGS)  # case-insensitive, in the question
    assert len(ids(text="50 - 8", lang="fr", strategy="greedy")) == 1 and ids(text="50 - 8", lang="en") == set()
    assert ids(text="100%") == set()  # LIKE wildcards are matched literally
    first = client.get("/api/searches", params={"batch": plan.batch_id, "per_page": 5}).json()
    second = client.get("/api/searches", params={"batch": plan.batch_id, "per_page": 5, "page": 2}).json()
    assert first["total"] == len(rows) and first["pages"] == -(-len(rows) // 5)
    assert not {s["id"] for s in first["searches"]} & {s["id"] for s in second["searches"]}
    bad = client.get("/api/searches", params={"conf_min": "high"})
    assert bad.status_code == 400 and "conf_min" in bad.json()["error"]
    assert client.get("/api/searches", params={"batch": "no-such-batch"}).status_code == 404
    page = client.get("/searches", params={"batch": plan.batch_id, "correct": "no"})
    assert page.status_code == 200 and page.text.count('<tr data-id="') == len(wrong)
    facets = client.get("/api/facets", params={"batch": plan.batch_id}).json()
    assert facets["langs"] == ["en", "fr"] and {"greedy", "mcts"} <= set(facets["strategies"])


def test_tree_chosen_path_tokens_and_links(explorer) -> None:
    client, store, plan = explorer
    mcts = next(r for r in store.find_searches(plan.batch_id, strategy="mcts", limit=None)
                if any(n.kind == "reflection" for n in store.load_nodes(str(r.id))))
    data = client.get(f"/api/searches/{mcts.id}").json()
    stored = store.load_nodes(str(mcts.id))
    assert [n["id"] for n in data["nodes"]] == [n.id for n in stored]
    assert {n["id"] for n in data["nodes"] if n["chosen"]} == set(map(str, mcts.chosen_path))
    assert [n["reflection"] for n in data["nodes"]] == [s.kind == "reflection" for s in stored]
    for n, s in zip(data["nodes"], stored):
        assert n["confidences"] == pytest.approx(s.confidences, abs=1e-5) and n["visits"] == s.visits
        if s.token_ids:  # the scripted tokenizer's pieces spell the node's text exactly
            assert len(n["pieces"]) == len(s.token_ids) and "".join(n["pieces"]) == s.text
    # the same problem searched by the other strategy is related and can be compared
    other = {r["id"]: r for r in data["related"]}
    twin = next(r for r in store.find_searches(plan.batch_id, strategy="greedy", limit=None) if r.problem_id == mcts.problem_id)
    assert str(twin.id) in other
    both = client.get("/api/compare", params={"a": str(mcts.id), "b": str(twin.id)}).json()
    assert both["a"]["label"] == CONFIGS[0].label and both["b"]["label"] == CONFIGS[1].label
    assert client.get("/api/compare", params={"a": str(mcts.id)}).status_code == 400
    # a node has a shareable URL: /node/ID redirects to its search page with the node's anchor
    target = data["nodes"][-1]["id"]
    r = client.get(f"/node/{target}", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == f"/search/{mcts.id}#node-{target}"
    assert client.get(f"/api/nodes/{target}").json()["node"]["id"] == target
    page = client.get(f"/search/{mcts.id}").text
    assert page.count('<li id="node-') == len(stored) and "↺ reflection" in page
    assert 'class="t" style="background:hsl(' in page  # text coloured token by token
    cmp = client.get("/compare", params={"a": str(mcts.id), "b": str(twin.id)}).text
    assert cmp.count('id="A-node-') == len(stored) and 'id="B-node-' in cmp
    assert client.get("/api/searches/not-a-search").status_code == 404


def test_pages_escape_and_lists(explorer) -> None:
    client, store, plan = explorer
    home = client.get("/")
    assert home.status_code == 200 and f'href="/batch/{plan.batch_id}"' in home.text
    assert home.headers["content-security-policy"].startswith("default-src 'self'")
    searches = client.get("/searches", params={"text": "<b>bold</b>"}).text
    assert "<b>bold</b>" not in searches and "&lt;b&gt;bold&lt;/b&gt;" in searches
    assert client.get("/static/ui.js").status_code == 200 and client.get("/static/ui.css").status_code == 200
    assert client.get("/search/nope").status_code == 404


def test_the_explorer_cannot_write(explorer) -> None:
    client, store, plan = explorer
    engine = client.app.state.explorer.engine
    before = store.batch_progress(plan.batch_id).to_dict()
    with pytest.raises(Exception, match="(?i)read-only|readonly|query_only|attempt to write"):
        with engine.begin() as conn:
            conn.execute(text("UPDATE searches SET final_answer = 'x'"))
    assert store.batch_progress(plan.batch_id).to_dict() == before


# ---------------------------------------------------------------------- over real HTTP (uvicorn)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: Any) -> Iterator[str]:
    """``app`` served by a real uvicorn on 127.0.0.1 (a thread); yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_token_required_over_http(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    store = Store.open(url)
    plan = stored_batch(store, configs=CONFIGS[1:], questions=QUESTIONS[:2])
    settings = UISettings(db=url, token="s3cret-token", require_token=True)  # what a non-loopback bind forces
    with running(create_app(settings)) as base:
        for path in ("/", "/api/batches", f"/api/batches/{plan.batch_id}", "/static/ui.js", f"/batch/{plan.batch_id}/plot.png"):
            r = httpx.get(base + path)
            assert r.status_code == 401, path
        assert httpx.get(base + "/api/batches", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(base + "/api/batches", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        assert httpx.get(base + "/api/batches", headers={"X-Marco-Token": "s3cret-token"}).status_code == 200
        # ?token= once: the cookie is set and the token leaves the address bar
        with httpx.Client(base_url=base) as browser:
            r = browser.get("/searches", params={"token": "s3cret-token", "lang": "en"}, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"] == "/searches?lang=en"
            assert browser.get("/searches?lang=en").status_code == 200
            assert browser.get("/api/batches").json()["batches"][0]["id"] == plan.batch_id
    store.close()


def test_refuses_to_bind_elsewhere_without_a_token(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MARCO_UI_TOKEN", raising=False)
    with pytest.raises(ValueError, match="--token"):
        UISettings(db="sqlite://", host="0.0.0.0").check()
    UISettings(db="sqlite://", host="0.0.0.0", token="t").check()
    assert not UISettings(db="sqlite://").token_required and UISettings(db="sqlite://", host="10.1.2.3").token_required
    out = CliRunner().invoke(cli, ["ui", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert out.exit_code == 1 and "without a token" in out.output
    out = CliRunner().invoke(cli, ["ui", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert out.exit_code == 1 and "no SQLite database" in out.output and not (tmp_path / "none.db").exists()
    (tmp_path / "empty.db").touch()
    out = CliRunner().invoke(cli, ["ui", "--db", f"sqlite:///{tmp_path / 'empty.db'}"])
    assert out.exit_code == 1 and "no marco store" in out.output


@pytest.mark.slow
def test_real_model_tree_is_coloured_token_by_token(tmp_path) -> None:
    """A batch of the bundled SmolLM2: its tokenizer splits every node's text into pieces that spell it."""
    url = f"sqlite:///{tmp_path / 'real.db'}"
    store = Store.open(url)
    plan = stored_batch(store, configs=[SearchConfig(strategy="mcts", action="ministep:16", budget=64, children=2, seed=0)],
                        model="smollm2", questions=["What is 40 + 2?"])
    client = TestClient(create_app(UISettings(db=url)), base_url="http://localhost")
    data = client.get(f"/api/searches/{plan.search_ids[0]}", params={"wait_tokens": "yes"}).json()
    assert data["pieces_loading"] is False
    with_tokens = [n for n in data["nodes"] if n["confidences"]]
    assert with_tokens and data["model"] == "smollm2"
    for n in with_tokens:
        assert n["pieces"] is not None and "".join(n["pieces"]) == n["text"] and len(n["pieces"]) == len(n["confidences"])
    page = client.get(f"/search/{plan.search_ids[0]}").text
    assert page.count('class="t" style=') == sum(len(n["confidences"]) for n in with_tokens)
    store.close()


@pytest.mark.slow
def test_marco_ui_command_serves(tmp_path) -> None:
    """`marco ui` as a user runs it: a real process, uvicorn on 127.0.0.1, pages and /api answer."""
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store.open(url)
    plan = stored_batch(store, configs=CONFIGS[1:], questions=QUESTIONS[:2])
    store.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "marco", "ui", "--db", url, "--port", str(port)],
                            env={**os.environ, "MARCO_UI_TOKEN": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/batches", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "marco ui did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["batches"][0]["id"] == plan.batch_id
        assert plan.batch_id in httpx.get(f"http://127.0.0.1:{port}/").text
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert f"http://localhost:{port}/" in out


def test_a_host_it_does_not_serve_is_refused_dns_rebinding(tmp_path) -> None:
    """A page on attacker.example whose name re-resolves to 127.0.0.1 reaches the explorer with its own Host:
    refused (421) before any query, on a real server; the names the operator uses still work."""
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    store = Store.open(url)
    stored_batch(store, configs=CONFIGS[1:], questions=QUESTIONS[:1])
    with running(create_app(UISettings(db=url))) as base:
        port = base.rsplit(":", 1)[1]
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", ""):
            r = httpx.get(base + "/api/batches", headers={"Host": host})
            assert r.status_code == 421, (host, r.status_code)
            assert "batches" not in r.json() and "--allowed-host" in r.json()["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            assert httpx.get(base + "/api/batches", headers={"Host": host}).status_code == 200, host
    with running(create_app(UISettings(db=url, allowed_hosts=("marco.lab.internal",)))) as base:
        assert httpx.get(base + "/api/batches", headers={"Host": "marco.lab.internal:80"}).status_code == 200
        assert httpx.get(base + "/api/batches", headers={"Host": "localhost"}).status_code == 421
    store.close()
