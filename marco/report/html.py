"""One self-contained HTML file that draws a search tree (no network: data, style and script inline).

Nodes are coloured by mean token confidence (red 0 → green 1); the chosen path is drawn thick. Clicking a
node shows its text, statistics and per-token confidences.
"""

from __future__ import annotations

import html
import json
from typing import Any, Sequence

from marco.search.tree import Node

_STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#222}
header{padding:10px 16px;border-bottom:1px solid #ddd;background:#fafafa}
header h1{font-size:16px;margin:0 0 4px}
header .q{white-space:pre-wrap;color:#444;max-height:6em;overflow:auto}
#wrap{display:flex;height:calc(100vh - 110px)}
#canvas{flex:1;overflow:auto}
#detail{width:38%;min-width:280px;border-left:1px solid #ddd;padding:10px 14px;overflow:auto}
#detail pre{white-space:pre-wrap;background:#f6f6f6;padding:8px;border-radius:4px}
circle.node{stroke:#333;stroke-width:1;cursor:pointer}
circle.node.chosen{stroke:#000;stroke-width:3}
circle.node.selected{stroke:#1565c0;stroke-width:4}
line.edge{stroke:#aaa;stroke-width:1.2}
line.edge.chosen{stroke:#222;stroke-width:3}
.tok{display:inline-block;min-width:8px;height:16px;margin:1px;border-radius:2px}
.legend span{display:inline-block;width:14px;height:10px;margin-right:2px}
table.stats td{padding:1px 8px 1px 0}
"""

_SCRIPT = """
const data = JSON.parse(document.getElementById('tree-data').textContent);
const byId = new Map(data.nodes.map(n => [n.id, Object.assign(n, {kids: []})]));
let root = null;
for (const n of data.nodes) { if (n.parent_id && byId.has(n.parent_id)) byId.get(n.parent_id).kids.push(n); else if (!root) root = n; }
const chosen = new Set(data.chosen_path);
const colour = c => c === null ? '#bbb' : `hsl(${Math.round(120 * Math.max(0, Math.min(1, c)))},70%,48%)`;
const fmt = v => v === null || v === undefined ? '-' : (typeof v === 'number' ? v.toFixed(3) : String(v));
let leaf = 0; const DX = 34, DY = 64, PAD = 24;
(function place(n) { n.kids.sort((a, b) => a.index - b.index); if (!n.kids.length) { n.x = leaf++ * DX; }
  else { n.kids.forEach(place); n.x = (n.kids[0].x + n.kids[n.kids.length - 1].x) / 2; } n.y = n.depth * DY; })(root);
const W = Math.max(1, leaf) * DX + 2 * PAD, H = (Math.max(...data.nodes.map(n => n.depth)) + 1) * DY + 2 * PAD;
const NS = 'http://www.w3.org/2000/svg';
const svg = document.createElementNS(NS, 'svg'); svg.setAttribute('width', W); svg.setAttribute('height', H); svg.id = 'tree';
const el = (tag, attrs) => { const e = document.createElementNS(NS, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); return e; };
for (const n of data.nodes) for (const k of n.kids) {
  const line = el('line', {x1: n.x + PAD, y1: n.y + PAD, x2: k.x + PAD, y2: k.y + PAD, 'class': 'edge' + (chosen.has(n.id) && chosen.has(k.id) ? ' chosen' : '')});
  svg.appendChild(line); }
for (const n of data.nodes) {
  const c = el('circle', {cx: n.x + PAD, cy: n.y + PAD, r: n.terminal ? 11 : 9, fill: colour(n.mean_confidence), 'data-id': n.id,
    'class': 'node' + (chosen.has(n.id) ? ' chosen' : '')});
  const t = el('title', {}); t.textContent = `${n.kind} · conf ${fmt(n.mean_confidence)} · value ${fmt(n.value)} · visits ${n.visits}`;
  c.appendChild(t); c.addEventListener('click', () => show(n)); svg.appendChild(c); }
document.getElementById('canvas').appendChild(svg);
function show(n) {
  document.querySelectorAll('circle.selected').forEach(e => e.classList.remove('selected'));
  document.querySelector(`circle[data-id="${n.id}"]`).classList.add('selected');
  const d = document.getElementById('detail'); d.innerHTML = '';
  const h = document.createElement('h2'); h.textContent = `${n.kind} node (depth ${n.depth})`; d.appendChild(h);
  const tbl = document.createElement('table'); tbl.className = 'stats';
  for (const [k, v] of [['id', n.id], ['mean confidence', fmt(n.mean_confidence)], ['value', fmt(n.value)], ['visits', n.visits],
      ['Q', n.visits ? fmt(n.value_sum / n.visits) : '-'], ['tokens', n.confidences.length], ['answer', n.answer ?? '-'],
      ['on chosen path', chosen.has(n.id) ? 'yes' : 'no']]) {
    const tr = tbl.insertRow(); tr.insertCell().textContent = k; tr.insertCell().textContent = v; }
  d.appendChild(tbl);
  const pre = document.createElement('pre'); pre.id = 'node-text'; pre.textContent = n.text; d.appendChild(pre);
  const toks = document.createElement('div'); toks.id = 'token-confidences';
  n.confidences.forEach((c, i) => { const s = document.createElement('span'); s.className = 'tok'; s.style.background = colour(c);
    s.title = `token ${i}: ${c.toFixed(4)}`; s.dataset.c = c; toks.appendChild(s); });
  const cap = document.createElement('p'); cap.textContent = `per-token confidence (${n.confidences.length} tokens; hover for values)`;
  d.appendChild(cap); d.appendChild(toks);
}
"""


def confidence_colour(c: float | None, lightness: int = 48) -> str:
    """The confidence scale every tree view uses: red (0) through yellow to green (1); grey for none."""
    if c is None:
        return "#bbb"
    return f"hsl({round(120 * max(0.0, min(1.0, float(c))))},70%,{lightness}%)"


def node_payload(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "parent_id": node.parent_id,
        "depth": node.depth,
        "index": node.index,
        "kind": node.kind,
        "text": node.text,
        "confidences": [round(float(c), 5) for c in node.confidences],
        "mean_confidence": node.mean_confidence,
        "value": node.value,
        "value_sum": node.value_sum,
        "visits": node.visits,
        "terminal": node.terminal,
        "answer": node.answer,
    }


def tree_html(nodes: Sequence[Node], chosen_path: Sequence[str], title: str, question: str = "",
              summary: str = "") -> str:
    """The HTML page for a search's ``nodes`` (any order; the first root found is drawn)."""
    if not nodes:
        raise ValueError("the search has no stored nodes to draw")
    data = {"nodes": [node_payload(n) for n in sorted(nodes, key=lambda n: n.seq)], "chosen_path": list(chosen_path)}
    blob = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # cannot close the <script> early
    legend = "".join(f'<span style="background:{confidence_colour(h / 120)}"></span>' for h in range(0, 121, 20))
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><div class=\"q\">{html.escape(question)}</div>"
        f"<div>{html.escape(summary)} <span class=\"legend\">confidence 0 {legend} 1</span></div></header>"
        "<div id=\"wrap\"><div id=\"canvas\"></div><aside id=\"detail\">Click a node to see its text and "
        "per-token confidences.</aside></div>"
        f"<script id=\"tree-data\" type=\"application/json\">{blob}</script>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
