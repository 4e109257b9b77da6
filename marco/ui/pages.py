"""Server-rendered HTML of the explorer's views (no template engine, no build step: every value escaped).

Each function takes the dicts :mod:`marco.ui.queries` returns (the same JSON ``/api/...`` serves) and returns
a page. The only script is ``/static/ui.js`` (expand/collapse, node anchors); styles are ``/static/ui.css``.
"""

from __future__ import annotations

from html import escape
from typing import Any, Sequence
from urllib.parse import urlencode

from marco.report.html import confidence_colour
from marco.report.tables import BatchReport, format_metric


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _verdict(correct: bool | None) -> str:
    if correct is None:
        return '<span class="verdict none">-</span>'
    return '<span class="verdict yes">✓</span>' if correct else '<span class="verdict no">✗</span>'


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _short(sid: str) -> str:
    return sid[:8]


def _excerpt(text: str | None, width: int = 90) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def layout(title: str, body: str, active: str = "") -> str:
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{label}</a>'
        for key, href, label in (("batches", "/", "Batches"), ("searches", "/searches", "Searches"),
                                 ("compare", "/compare", "Compare"))
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)} · marco</title><link rel="stylesheet" href="/static/ui.css"></head><body>'
        f'<header class="top"><a class="brand" href="/">marco traces</a><nav>{nav}</nav></header>'
        f'<main>{body}</main><script src="/static/ui.js"></script></body></html>\n'
    )


def legend() -> str:
    cells = "".join(f'<span style="background:{confidence_colour(i / 6, 80)}"></span>' for i in range(7))
    return f'<span class="legend">confidence c<sub>i</sub> 0 {cells} 1</span>'


def _progress(fraction: float | None) -> str:
    f = fraction or 0.0
    return f'<span class="bar" title="{_pct(fraction)}"><span style="width:{100 * f:.0f}%"></span></span> {_pct(fraction)}'


# ---------------------------------------------------------------------- batches
def _per_label(b: dict[str, Any]) -> str:
    return "<br>".join(
        f'<a href="/searches?{urlencode({"batch": b["id"], "strategy": g["label"]})}">{_e(g["label"])}</a> '
        f'{_pct(g["accuracy"]) if g["scored"] else _num(g["mean_score"], 2)}' for g in b.get("labels", [])
    )


def batches_page(batches: Sequence[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><a href="/batch/{b["id"]}">{_e(b["name"])}</a><div class="id">{b["id"]}</div></td>'
        f'<td>{_e(b["kind"])}</td><td>{_e(b["dataset"])}</td><td class="status {b["status"]}">{_e(b["status"])}</td>'
        f'<td class="nowrap">{_progress(b["progress"])}</td><td class="num">{b["done"]}/{b["n_searches"]}</td>'
        f'<td class="num">{b["failed"]}</td><td class="num">{_pct(b["accuracy"])}</td><td class="per">{_per_label(b)}</td>'
        f'<td class="num">{_num(b["tokens_per_search"], 0)}</td><td class="nowrap">{_e((b["created_at"] or "")[:16].replace("T", " "))}</td></tr>'
        for b in batches
    )
    body = (
        f"<h1>Batches</h1><p>{_plural(len(batches), 'batch', 'batches')}, newest first.</p>"
        '<table class="list" id="batches"><thead><tr><th>batch</th><th>kind</th><th>dataset</th><th>status</th>'
        "<th>progress</th><th>done</th><th>failed</th><th>accuracy</th><th>per strategy</th><th>tokens/search</th><th>created</th></tr>"
        f"</thead><tbody>{rows or '<tr><td colspan=11>No batches yet: run `marco run` first.</td></tr>'}</tbody></table>"
    )
    return layout("Batches", body, "batches")


def batch_page(b: dict[str, Any], report: BatchReport | None, report_error: str | None = None) -> str:
    labels = sorted({g["label"] for g in b["groups"]})
    langs = sorted({g["lang"] for g in b["groups"]})
    cell = {(g["label"], g["lang"]): g for g in b["groups"]}
    head = "".join(f"<th>{_e(lang)}</th>" for lang in langs)

    def fmt(g: dict[str, Any] | None) -> str:
        if g is None:
            return "<td>-</td>"
        figure = _pct(g["accuracy"]) if g["scored"] else _num(g["mean_score"], 2)
        return f'<td class="num" title="{g["done"]}/{g["searches"]} done">{figure}<small> ({g["done"]}/{g["searches"]})</small></td>'

    rows = "".join(
        f'<tr><th><a href="/searches?{urlencode({"batch": b["id"], "strategy": label})}">{_e(label)}</a></th>'
        + "".join(fmt(cell.get((label, lang))) for lang in langs) + "</tr>"
        for label in labels
    )
    table = (f'<table class="grid" id="per-label"><thead><tr><th>strategy / language</th>{head}</tr></thead>'
             f"<tbody>{rows}</tbody></table>")
    if report is not None and report.rows:
        unit = " (%)" if report.metric == "accuracy" else ""
        rep_rows = "".join(
            f"<tr><th>{_e(r.label)}</th><td class=num>{format_metric(r.overall, report.metric)}</td>"
            f"<td class=num>{r.problems}</td><td class=num>{r.failed}</td><td class=num>{r.tokens_per_problem:.0f}</td>"
            f"<td class=num>{r.seconds_per_problem:.2f}</td></tr>"
            for r in report.rows
        )
        rep = (f'<h2>Report: {_e(report.metric)}{unit} at the tokens each strategy spent</h2>'
               f'<table class="grid" id="report"><thead><tr><th>strategy/action</th><th>{_e(report.metric)}</th>'
               "<th>problems</th><th>failed</th><th>tokens/problem</th><th>s/problem</th></tr></thead>"
               f"<tbody>{rep_rows}</tbody></table>"
               f'<img class="plot" id="plot" alt="{_e(report.metric)} vs tokens" src="/batch/{b["id"]}/plot.png">')
    else:
        rep = f'<p class="muted">No report yet{": " + _e(report_error) if report_error else " (no finished searches)"}.</p>'
    body = (
        f'<h1>Batch {_e(b["name"])}</h1><p class="id">{b["id"]}</p>'
        f'<p>{_e(b["kind"])} · {_e(b["dataset"])} · model {_e(b.get("model"))} · <span class="status {b["status"]}">'
        f'{_e(b["status"])}</span> · {_progress(b["progress"])} · {b["done"]} done, {b["failed"]} failed of '
        f'{b["n_searches"]} searches · accuracy {_pct(b["accuracy"])} · {b["tokens"]} tokens</p>'
        f'<p><a href="/searches?{urlencode({"batch": b["id"]})}">searches of this batch →</a> · '
        f'<a href="/api/batches/{b["id"]}">JSON</a></p>'
        f"<h2>Accuracy (or mean score) per strategy and language</h2>{table}{rep}"
    )
    return layout(f"Batch {b['name']}", body, "batches")


# ---------------------------------------------------------------------- searches list
def _select(name: str, options: Sequence[tuple[str, str]], current: str | None) -> str:
    opts = "".join(
        f'<option value="{_e(v)}"{" selected" if (current or "") == v else ""}>{_e(label)}</option>' for v, label in options
    )
    return f'<select name="{name}" id="f-{name}">{opts}</select>'


def searches_page(result: dict[str, Any], facets: dict[str, list[str]]) -> str:
    f = result["filters"]
    form = (
        '<form class="filters" id="filters" method="get" action="/searches">'
        f'<label>batch <input name="batch" id="f-batch" value="{_e(f.get("batch"))}" placeholder="id or name"></label>'
        f'<label>strategy {_select("strategy", [("", "any")] + [(s, s) for s in facets["strategies"]], f.get("strategy"))}</label>'
        f'<label>language {_select("lang", [("", "any")] + [(s, s) for s in facets["langs"]], f.get("lang"))}</label>'
        f'<label>answer {_select("correct", [("", "any"), ("yes", "correct"), ("no", "wrong")], f.get("correct"))}</label>'
        f'<label>confidence <input name="conf_min" id="f-conf_min" size=4 value="{_e(f.get("conf_min"))}" placeholder="0">'
        f' – <input name="conf_max" id="f-conf_max" size=4 value="{_e(f.get("conf_max"))}" placeholder="1"></label>'
        f'<label>question contains <input name="text" id="f-text" value="{_e(f.get("text"))}"></label>'
        '<button type="submit">Filter</button> <a href="/searches">clear</a></form>'
    )
    rows = "".join(
        f'<tr data-id="{s["id"]}"><td><a href="/search/{s["id"]}">{_short(s["id"])}</a></td>'
        f'<td>{_e(s["dataset"])}/{_e(s["lang"])}/{_e(s["index"])}</td><td class="q">{_e(_excerpt(s["question"]))}</td>'
        f'<td>{_e(s["label"])}</td><td class="status {s["status"]}">{_e(s["status"])}</td><td>{_e(s["answer"])}</td>'
        f'<td>{_verdict(s["correct"])}</td><td class="num">{_num(s["confidence"])}</td><td class="num">{s["tokens"]}</td></tr>'
        for s in result["searches"]
    )
    pager = ""
    if result["pages"] > 1:
        links = []
        for label, page in (("← previous", result["page"] - 1), ("next →", result["page"] + 1)):
            if 1 <= page <= result["pages"]:
                links.append(f'<a href="/searches?{urlencode({**f, "page": page})}">{label}</a>')
        pager = f'<p class="pager">page {result["page"]} of {result["pages"]} · {" · ".join(links)}</p>'
    api = f'/api/searches?{urlencode(f)}' if f else "/api/searches"
    body = (
        f'<h1>Searches</h1>{form}<p id="count">{result["total"]} searches match · <a href="{_e(api)}">JSON</a></p>'
        '<table class="list" id="searches"><thead><tr><th>search</th><th>problem</th><th>question</th><th>strategy</th>'
        "<th>status</th><th>answer</th><th>correct</th><th>confidence</th><th>tokens</th></tr></thead>"
        f"<tbody>{rows or '<tr><td colspan=9>No search matches these filters.</td></tr>'}</tbody></table>{pager}"
    )
    return layout("Searches", body, "searches")


# ---------------------------------------------------------------------- one tree
def token_text(node: dict[str, Any]) -> str:
    """The node's text, each token on the background its confidence gives (or the text and colour blocks
    when the per-token pieces are unknown)."""
    confs = node["confidences"]
    pieces = node.get("pieces")
    if pieces is not None and len(pieces) == len(confs):
        spans = "".join(
            f'<span class="t" style="background:{confidence_colour(c, 82)}" title="c={c:.4f}">{_e(p)}</span>'
            for p, c in zip(pieces, confs)
        )
        return f'<div class="text tokens">{spans}</div>'
    if not confs and node["kind"] == "reflection":  # inserted by the search, not generated: no confidences
        return f'<div class="text injected" title="inserted by the search, not generated: no confidences">{_e(node["text"])}</div>'
    blocks = "".join(f'<span class="tok" style="background:{confidence_colour(c)}" title="token {i}: c={c:.4f}"></span>'
                     for i, c in enumerate(confs))
    return f'<div class="text">{_e(node["text"])}</div>' + (f'<div class="blocks">{blocks}</div>' if blocks else "")


def _node_summary(n: dict[str, Any], search_id: str) -> str:
    answer = f' · answer <b class="answer">{_e(n["answer"])}</b>' if n["answer"] is not None else ""
    badge = ' <span class="badge reflection" title="reflection: the model is asked to re-check itself">↺ reflection</span>' \
        if n["reflection"] else ""
    chosen = ' <span class="badge chosen" title="on the chosen path">chosen</span>' if n["chosen"] else ""
    return (
        f'<span class="kind k-{n["kind"]}">{_e(n["kind"])}</span>{badge}{chosen} '
        f'<span class="dot" style="background:{confidence_colour(n["mean_confidence"])}"></span>'
        f' #{n["seq"]} · visits {n["visits"]} · value {_num(n["value"])} · Q {_num(n["q"])} · '
        f'conf {_num(n["mean_confidence"])} · {n["num_tokens"]} tok{answer}'
        f' <a class="anchor" href="/search/{search_id}#node-{n["id"]}" title="link to this node">¶</a>'
    )


def tree_html(search: dict[str, Any], prefix: str = "") -> str:
    """The collapsible tree: nested ``<details>``; the root and the chosen path start open."""
    nodes = search["nodes"]
    if not nodes:
        return f'<p class="muted">No stored nodes{": " + _e(search["error"]) if search.get("error") else ""}.</p>'
    kids: dict[str | None, list[dict[str, Any]]] = {}
    ids = {n["id"] for n in nodes}
    for n in nodes:
        kids.setdefault(n["parent_id"] if n["parent_id"] in ids else None, []).append(n)
    for v in kids.values():
        v.sort(key=lambda n: (n["index"], n["seq"]))
    out: list[str] = []

    def walk(n: dict[str, Any]) -> None:  # depth is bounded by the search's max_depth
        classes = ["node", f"k-{n['kind']}"] + (["chosen"] if n["chosen"] else []) + (["reflection"] if n["reflection"] else [])
        is_open = n["chosen"] or n["parent_id"] is None
        children = kids.get(n["id"], [])
        out.append(f'<li id="{prefix}node-{n["id"]}" class="{" ".join(classes)}" data-id="{n["id"]}">'
                   f'<details{" open" if is_open else ""}{" class=leaf" if not children else ""}>'
                   f"<summary>{_node_summary(n, search['id'])}</summary>{token_text(n)}")
        if children:
            out.append('<ul class="tree">')
            for c in children:
                walk(c)
            out.append("</ul>")
        out.append("</details></li>")

    out.append('<ul class="tree root">')
    for root in kids.get(None, []):
        walk(root)
    out.append("</ul>")
    tools = ('<div class="tools"><button type="button" data-tree-action="expand">expand all</button> '
             '<button type="button" data-tree-action="collapse">collapse all</button> '
             '<button type="button" data-tree-action="chosen">chosen path</button> ' + legend() + "</div>")
    return f'<div class="treebox" data-search="{search["id"]}">{tools}{"".join(out)}</div>'


def _search_header(s: dict[str, Any]) -> str:
    ref = ", ".join(s["reference"]) if s["reference"] else "-"
    return (
        f'<div class="searchhead"><div class="meta"><b>{_e(s["label"])}</b> on {_e(s["dataset"])}/{_e(s["lang"])}/'
        f'{_e(s["index"])} · model {_e(s.get("model"))} · {_e(s["status"])} · answer <b>{_e(s["answer"])}</b> '
        f'{_verdict(s["correct"])} (reference {_e(ref)}) · confidence {_num(s["confidence"])} · {s["tokens"]} tokens · '
        f'{len(s["nodes"])} nodes · <a href="/batch/{s["batch_id"]}">batch</a></div>'
        f'<div class="question">{_e(s["question"])}</div>'
        + (f'<div class="error">{_e(s["error"])}</div>' if s.get("error") else "")
        + (f'<div class="notice" id="pieces-loading">The tokenizer of {_e(s.get("model"))} is loading: text shows '
           "colour blocks per token until then; reload in a moment.</div>" if s.get("pieces_loading") else "")
        + "</div>"
    )


def search_page(s: dict[str, Any], related: Sequence[dict[str, Any]]) -> str:
    rel = "".join(
        f'<li><a href="/search/{r["id"]}">{_e(r["label"])}</a> · model {_e(r.get("model"))} · batch '
        f'<a href="/batch/{r["batch_id"]}">{_short(r["batch_id"])}</a> · answer {_e(r["answer"])} {_verdict(r["correct"])} · '
        f'{r["tokens"]} tokens · <a class="cmp" href="/compare?{urlencode({"a": s["id"], "b": r["id"]})}">compare side by side</a></li>'
        for r in related
    )
    body = (
        f'<h1>Search <span class="id">{s["id"]}</span></h1>{_search_header(s)}'
        f'<p><a href="/api/searches/{s["id"]}">JSON</a></p>'
        + (f'<details class="related" open><summary>{_plural(len(related), "other search", "other searches")} of this '
           f'problem (any batch)</summary><ul>{rel}</ul></details>'
           if related else "")
        + tree_html(s)
    )
    return layout(f"Search {_short(s['id'])}", body, "searches")


def compare_page(a: dict[str, Any] | None, b: dict[str, Any] | None, form: dict[str, str]) -> str:
    picker = (
        '<form class="filters" method="get" action="/compare">'
        f'<label>search A <input name="a" size=38 value="{_e(form.get("a"))}"></label>'
        f'<label>search B <input name="b" size=38 value="{_e(form.get("b"))}"></label><button>Compare</button></form>'
    )
    if a is None or b is None:
        return layout("Compare", f"<h1>Compare two searches</h1>{picker}<p>Give two search ids, or use "
                                 "“compare side by side” on a search page.</p>", "compare")
    cols = "".join(
        f'<section class="col"><h2>{side}: <a href="/search/{s["id"]}">{_e(s["label"])}</a></h2>'
        f"{_search_header(s)}{tree_html(s, prefix=side + '-')}</section>"
        for side, s in (("A", a), ("B", b))
    )
    same = a["dataset"] == b["dataset"] and a["lang"] == b["lang"] and a["index"] == b["index"]
    note = "" if same else '<p class="error">These two searches are of different problems.</p>'
    api = f'/api/compare?{urlencode({"a": a["id"], "b": b["id"]})}'
    return layout("Compare", f'<h1>Side by side</h1>{picker}{note}<p><a href="{api}">JSON</a></p>'
                             f'<div class="cols" id="compare">{cols}</div>', "compare")


def error_page(status: int, message: str) -> str:
    return layout(f"{status}", f'<h1>{status}</h1><p class="error">{_e(message)}</p><p><a href="/">back to batches</a></p>')
