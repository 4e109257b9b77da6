"""`marco ui` in a real headless Chromium over a real uvicorn: pages load from a stored batch, a filter
changes the list, a tree node expands, a shared node link opens at its node. Screenshots are saved in the
test's tmp dir and copied to ``test-artifacts/ui/`` (ignored by git); their paths are printed."""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path

import pytest

from marco.store import Store
from marco.ui.app import UISettings, create_app
from test_traces_html import CDP, browser  # noqa: F401  (the project's CDP client and its Chromium fixture)
from test_ui import running, stored_batch

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"


def wait_for(cdp: CDP, expression: str, timeout: float = 20) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cdp.eval(expression)
        if value:
            return value
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.1)


def visit(cdp: CDP, url: str) -> None:
    cdp.eval("window.__loaded = false")
    cdp.call("Page.navigate", url=url)
    wait_for(cdp, "document.readyState === 'complete' && window.__loaded !== false && !!document.querySelector('main')")


def shot(cdp: CDP, tmp: Path, name: str, full: bool = True) -> Path:
    params: dict = {"format": "png"}
    if full:
        size = json.loads(cdp.eval("JSON.stringify([document.documentElement.scrollWidth, document.documentElement.scrollHeight])"))
        params.update(captureBeyondViewport=True,
                      clip={"x": 0, "y": 0, "width": max(1400, size[0]), "height": min(max(900, size[1]), 4000), "scale": 1})
    data = base64.b64decode(cdp.call("Page.captureScreenshot", **params)["data"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    path = tmp / f"{name}.png"
    path.write_bytes(data)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)
    print(f"screenshot: {ARTIFACTS / path.name}")
    return path


def click(cdp: CDP, selector: str) -> None:
    """A real mouse click (pressed + released) at the element's centre."""
    cdp.eval(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
    box = json.loads(cdp.eval(f"JSON.stringify(document.querySelector({json.dumps(selector)}).getBoundingClientRect())"))
    x, y = box["x"] + min(20, box["width"] / 2), box["y"] + box["height"] / 2
    for kind in ("mousePressed", "mouseReleased"):
        cdp.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


@pytest.mark.slow
def test_explorer_in_chromium(tmp_path: Path, browser: CDP) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    store = Store.open(url)
    plan = stored_batch(store)
    rows = store.find_searches(plan.batch_id, limit=None)
    browser.call("Page.enable")
    with running(create_app(UISettings(db=url))) as base:
        # batches: the stored batch with its progress and accuracy
        visit(browser, base + "/")
        assert browser.eval("document.querySelectorAll('#batches tbody tr').length") == 1
        assert plan.batch_id in browser.eval("document.querySelector('#batches').textContent")
        shot(browser, tmp_path, "01-batches")

        # one batch: per label x language table, report and the accuracy-vs-tokens plot
        visit(browser, f"{base}/batch/{plan.batch_id}")
        assert browser.eval("document.querySelectorAll('#per-label tbody tr').length") == 2
        wait_for(browser, "document.getElementById('plot').complete && document.getElementById('plot').naturalWidth > 0")
        shot(browser, tmp_path, "02-batch")

        # searches: choosing a filter in the form changes the list
        visit(browser, f"{base}/searches?batch={plan.batch_id}")
        assert browser.eval("document.querySelectorAll('#searches tbody tr[data-id]').length") == len(rows)
        browser.eval("document.getElementById('f-correct').value = 'no'; document.getElementById('f-lang').value = 'fr';"
                     "window.__loaded = false; document.getElementById('filters').submit()")
        wait_for(browser, "location.search.includes('correct=no') && document.readyState === 'complete'")
        expected = [r for r in rows if r.correct is False and r.lang == "fr"]
        wait_for(browser, f"document.querySelectorAll('#searches tbody tr[data-id]').length === {len(expected)}")
        assert set(browser.eval("[...document.querySelectorAll('#searches tbody tr[data-id]')].map(r => r.dataset.id)")) == {
            str(r.id) for r in expected}
        shot(browser, tmp_path, "03-searches-filtered")

        # a tree: collapsed nodes expand on a click; tokens coloured; the chosen path open
        mcts = max((r for r in rows if r.strategy == "mcts"), key=lambda r: store.count_nodes(str(r.id)))
        nodes = store.load_nodes(str(mcts.id))
        visit(browser, f"{base}/search/{mcts.id}")
        assert browser.eval("document.querySelectorAll('li.node').length") == len(nodes)
        chosen = {str(i) for i in mcts.chosen_path}
        assert set(browser.eval("[...document.querySelectorAll('li.node.chosen')].map(e => e.dataset.id)")) == chosen
        closed = next(n for n in nodes if n.id not in chosen and any(c.parent_id == n.id for c in nodes)
                      and n.parent_id in chosen)
        child = next(c for c in nodes if c.parent_id == closed.id)
        visible = f"document.getElementById('node-{child.id}').checkVisibility()"
        assert not browser.eval(visible)
        click(browser, f"#node-{closed.id} > details > summary")
        wait_for(browser, f"document.querySelector('#node-{closed.id} > details').open")
        assert browser.eval(visible)
        assert browser.eval("document.querySelectorAll('.text.tokens .t').length") > 0
        shot(browser, tmp_path, "04-tree-expanded")

        # a shared node link opens the tree down to that node and marks it
        deep = max((n for n in nodes if n.id not in chosen), key=lambda n: n.depth)
        visit(browser, f"{base}/node/{deep.id}")
        wait_for(browser, f"location.hash === '#node-{deep.id}'")
        assert browser.eval(f"document.getElementById('node-{deep.id}').classList.contains('target')")
        assert browser.eval(f"document.getElementById('node-{deep.id}').checkVisibility()")
        assert browser.eval(f"document.querySelector('#node-{deep.id} > details > .text').checkVisibility()")
        shot(browser, tmp_path, "05-node-link", full=False)

        # two strategies on the same problem, side by side
        twin = next(r for r in rows if r.strategy == "greedy" and r.problem_id == mcts.problem_id)
        visit(browser, f"{base}/compare?a={mcts.id}&b={twin.id}")
        assert browser.eval("document.querySelectorAll('#compare section.col').length") == 2
        click(browser, "#compare section.col:first-child button[data-tree-action='expand']")
        assert browser.eval("[...document.querySelectorAll('#compare section.col:first-child li.node > details')].every(d => d.open)")
        shot(browser, tmp_path, "06-compare")
    store.close()
