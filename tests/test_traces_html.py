"""The HTML tree view in a real headless Chromium: it renders every node, and a click shows the text."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco.cli import app
from marco.jobs import BackendCache, execute_job
from marco.search.base import SearchConfig
from marco.store import Store
from marco.tasks.base import Problem

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class CDP:
    """A minimal Chrome DevTools Protocol client (one page, synchronous)."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):  # noqa: ANN201
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    def eval(self, expression: str):  # noqa: ANN201
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")


@pytest.fixture()
def browser(tmp_path: Path):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: run `make install` (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1400,900",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(p for p in pages if p["type"] == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
def test_html_tree_renders_and_click_shows_text(tmp_path: Path, browser: CDP) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    store = Store.open(url)
    problems = [Problem("mgsm", "en", 0, "What is 40 + 2? </script><b>not html</b>", ("42",))]
    plan = store.create_batch(problems, [SearchConfig(strategy="mcts", action="ministep:6", budget=300, children=2, seed=3)],
                              model="scripted", task="mgsm")
    assert execute_job(store, plan.job_ids[0], BackendCache(), "w").status == "done"
    sid = plan.search_ids[0]
    nodes = store.load_nodes(sid)
    target = max((n for n in nodes if n.text and n.confidences), key=lambda n: (n.depth, n.seq))

    out = tmp_path / "tree.html"
    result = CliRunner().invoke(app, ["traces", "tree", sid, "--html", str(out), "--db", url])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "src=" not in page and "<link" not in page  # self-contained: nothing to fetch

    browser.call("Page.enable")
    browser.call("Page.navigate", url=out.as_uri())
    deadline = time.monotonic() + 20
    while (browser.eval("document.querySelectorAll('circle.node').length") or 0) < len(nodes):
        assert time.monotonic() < deadline, "the tree never rendered"
        time.sleep(0.1)
    assert browser.eval("document.querySelectorAll('circle.node').length") == len(nodes)
    assert browser.eval("document.querySelectorAll('line.edge').length") == len(nodes) - 1
    # the question's markup stayed text
    assert browser.eval("document.querySelectorAll('header b').length") == 0
    assert "not html" in browser.eval("document.querySelector('header .q').textContent")
    assert browser.eval("document.getElementById('node-text')") is None

    selector = f'circle[data-id="{target.id}"]'
    browser.eval(f"document.querySelector('{selector}').scrollIntoView({{block: 'center', inline: 'center'}})")
    rect = browser.eval(f"JSON.stringify(document.querySelector('{selector}').getBoundingClientRect())")
    box = json.loads(rect)
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    shown = browser.eval("document.getElementById('node-text') && document.getElementById('node-text').textContent")
    assert shown == target.text
    assert browser.eval("document.querySelectorAll('#token-confidences .tok').length") == len(target.confidences)
    assert browser.eval(f"document.querySelector('{selector}').classList.contains('selected')")
    shot = browser.call("Page.captureScreenshot", format="png")
    assert len(shot["data"]) > 1000
