"""Self-contained HTML views (one file each, inline CSS and JavaScript, nothing fetched from a network).

``attention_html(prompt)`` (``spartan density CKPT --prompt TEXT --html FILE``): the prompt's tokens, a
button per head (its share of open gates); choosing one draws, for that head, which keys each query reads:
the sparse model's open gates weighted by A = P * M on the left, the dense base's pattern P on the right
(its strongest keys per query). Hovering a token highlights the edges it sends or receives.
``circuit_html(panels)`` (``circuit.html`` in ``spartan circuit --out``): each model's circuit drawn in layer
rows (input at the bottom, logits on top), edges coloured by the sign of their score and sized by |score|;
clicking a node keeps only its edges lit, clicking again shows all.
Both embed their data as JSON in a <script type="application/json"> block and draw with plain SVG.
"""

from __future__ import annotations

import html
import json

DENSE_KEYS_PER_QUERY = 8  # the dense panel keeps each query's strongest keys (P >= DENSE_MIN_WEIGHT) ...
DENSE_MIN_WEIGHT = 0.02  # ... so a 12 x 12-head model's page stays small

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; } .note { color: #666; font-size: 12px; margin: 4px 0 12px; }
#heads { display: grid; gap: 3px; margin-bottom: 12px; }
#heads button { font: 11px monospace; padding: 2px 4px; border: 1px solid #bbb; background: #f7f7f7; cursor: pointer; }
#heads button.selected { background: #1f77b4; color: white; border-color: #1f77b4; }
.panels { display: flex; gap: 24px; flex-wrap: wrap; } .panel h2 { font-size: 14px; margin: 4px 0; }
svg text { font: 11px monospace; cursor: default; } svg text.hl { font-weight: bold; fill: #d62728; }
svg line.edge { stroke: #1f77b4; } svg line.edge.hl { stroke: #d62728; } svg line.edge.dim { opacity: 0.05; }
svg .node { cursor: pointer; } svg .node.sel rect, svg .node.sel ellipse { stroke: #d62728; stroke-width: 2; }
"""

_ATTENTION_JS = """
const D = JSON.parse(document.getElementById('data').textContent);
const heads = document.getElementById('heads');
heads.style.gridTemplateColumns = `repeat(${D.n_heads}, auto)`;
let current = null;
for (let l = 0; l < D.n_layers; l++) for (let h = 0; h < D.n_heads; h++) {
  const b = document.createElement('button'); const name = `a${l}.h${h}`;
  b.textContent = `${name} ${(100 * D.density[l][h]).toFixed(0)}%`; b.dataset.head = name;
  b.onclick = () => show(name); heads.appendChild(b);
}
function draw(svgId, edges) {
  const svg = document.getElementById(svgId); while (svg.firstChild) svg.removeChild(svg.firstChild);
  const n = D.tokens.length, dy = 16, w = 320, x0 = 90, x1 = w - 90;
  svg.setAttribute('height', n * dy + 20); svg.setAttribute('width', w);
  const ns = 'http://www.w3.org/2000/svg';
  for (const [q, k, a] of edges) {
    const e = document.createElementNS(ns, 'line');
    e.setAttribute('x1', x0); e.setAttribute('y1', 14 + k * dy); e.setAttribute('x2', x1); e.setAttribute('y2', 14 + q * dy);
    e.setAttribute('stroke-width', 0.5 + 3 * a); e.setAttribute('stroke-opacity', Math.max(0.15, a));
    e.setAttribute('class', 'edge'); e.dataset.q = q; e.dataset.k = k; svg.appendChild(e);
  }
  for (const [side, x, anchor] of [['k', x0 - 4, 'end'], ['q', x1 + 4, 'start']]) D.tokens.forEach((t, i) => {
    const s = document.createElementNS(ns, 'text'); s.textContent = t; s.setAttribute('x', x);
    s.setAttribute('y', 18 + i * dy); s.setAttribute('text-anchor', anchor); s.dataset.pos = i; s.dataset.side = side;
    s.onmouseenter = () => hover(svg, side, i); s.onmouseleave = () => hover(svg, null, -1); svg.appendChild(s);
  });
}
function hover(svg, side, i) {
  for (const e of svg.querySelectorAll('line.edge')) {
    const on = side !== null && Number(e.dataset[side]) === i;
    e.classList.toggle('hl', on); e.classList.toggle('dim', side !== null && !on);
  }
  for (const s of svg.querySelectorAll('text')) s.classList.toggle('hl', side !== null && s.dataset.side === side && Number(s.dataset.pos) === i);
}
function show(name) {
  current = name;
  for (const b of heads.children) b.classList.toggle('selected', b.dataset.head === name);
  draw('sparse', D.sparse[name]);
  if (D.dense) draw('dense', D.dense[name]);
  document.getElementById('selected').textContent = `${name}: ${D.sparse[name].length} open (query, key) pairs` +
    (D.dense ? `, dense base: ${D.dense_counts[name]} causal pairs` : '');
}
show(D.first);
"""

_CIRCUIT_JS = """
const D = JSON.parse(document.getElementById('data').textContent);
const ns = 'http://www.w3.org/2000/svg';
function place(p) {
  const L = p.n_layers, H = p.n_heads, colW = 46, rowH = 58, width = Math.max(260, (H + 1) * colW + 40);
  const rows = p.parallel ? L + 2 : 2 * L + 2, pos = {};
  const y = r => 20 + (rows - 1 - r) * rowH;
  pos['input'] = [width / 2, y(0)];
  for (let l = 0; l < L; l++) {
    const ra = p.parallel ? l + 1 : 2 * l + 1, rm = p.parallel ? l + 1 : 2 * l + 2;
    for (let h = 0; h < H; h++) pos[`a${l}.h${h}`] = [30 + h * colW, y(ra)];
    pos[`m${l}`] = [p.parallel ? 30 + H * colW : width / 2, y(rm)];
  }
  pos['logits'] = [width / 2, y(rows - 1)];
  return [pos, width, rows * rowH];
}
function drawPanel(svg, p) {
  const [pos, w, h] = place(p); svg.setAttribute('width', w); svg.setAttribute('height', h);
  const peak = Math.max(1e-12, ...p.edges.map(e => Math.abs(e.score)));
  for (const e of p.edges) {
    const [a, b] = [pos[e.parent], pos[e.child]]; if (!a || !b) continue;
    const l = document.createElementNS(ns, 'line');
    l.setAttribute('x1', a[0]); l.setAttribute('y1', a[1]); l.setAttribute('x2', b[0]); l.setAttribute('y2', b[1]);
    l.setAttribute('stroke', e.score <= 0 ? '#1f77b4' : '#d62728'); l.setAttribute('stroke-width', 0.5 + 4 * Math.abs(e.score) / peak);
    l.setAttribute('class', 'edge'); l.dataset.parent = e.parent; l.dataset.child = e.child;
    const t = document.createElementNS(ns, 'title'); t.textContent = `${e.name}: ${e.score.toPrecision(4)}`; l.appendChild(t);
    svg.appendChild(l);
  }
  for (const n of p.nodes) {
    const g = document.createElementNS(ns, 'g'); g.setAttribute('class', 'node'); g.dataset.name = n;
    const [x, y] = pos[n]; const box = document.createElementNS(ns, n.startsWith('a') ? 'ellipse' : 'rect');
    if (n.startsWith('a')) { box.setAttribute('cx', x); box.setAttribute('cy', y); box.setAttribute('rx', 20); box.setAttribute('ry', 10); }
    else { box.setAttribute('x', x - 22); box.setAttribute('y', y - 10); box.setAttribute('width', 44); box.setAttribute('height', 20); }
    box.setAttribute('fill', n.startsWith('a') ? '#cfe2f3' : n.startsWith('m') ? '#fce5cd' : '#dddddd'); box.setAttribute('stroke', '#888');
    const s = document.createElementNS(ns, 'text'); s.textContent = n; s.setAttribute('x', x); s.setAttribute('y', y + 4); s.setAttribute('text-anchor', 'middle');
    g.appendChild(box); g.appendChild(s); g.onclick = () => select(svg, n); svg.appendChild(g);
  }
}
function select(svg, name) {
  const again = svg.dataset.selected === name; svg.dataset.selected = again ? '' : name;
  for (const g of svg.querySelectorAll('.node')) g.classList.toggle('sel', !again && g.dataset.name === name);
  for (const l of svg.querySelectorAll('line.edge')) {
    const on = l.dataset.parent === name || l.dataset.child === name;
    l.classList.toggle('hl', !again && on); l.classList.toggle('dim', !again && !on);
  }
}
const panels = document.getElementById('panels');
for (const p of D.panels) {
  const div = document.createElement('div'); div.className = 'panel';
  const h = document.createElement('h2'); h.textContent = `${p.label}: ${p.edges.length} edges, ${p.nodes.length} nodes` +
    (p.faithfulness === null ? '' : `, F ${p.faithfulness.toFixed(3)}`);
  const svg = document.createElementNS(ns, 'svg'); svg.id = p.id; div.appendChild(h); div.appendChild(svg); panels.appendChild(div);
  drawPanel(svg, p);
}
"""


def _page(title: str, note: str, body: str, data: dict, script: str) -> str:
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # no "</script>" inside the JSON
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><div class=\"note\">{html.escape(note)}"
            f"</div>{body}<script type=\"application/json\" id=\"data\">{payload}</script><script>{script}</script>"
            "</body></html>\n")


def attention_html(prompt, *, title: str) -> str:
    """The page of one prompt's attention (measure.density.PromptAttention), with its base pattern if any."""
    n_layers, n_heads, pos, _ = prompt.gates.shape
    sparse, dense, dense_counts = {}, {}, {}
    for layer in range(n_layers):
        for head in range(n_heads):
            name = f"a{layer}.h{head}"
            open_pairs = prompt.gates[layer, head].nonzero().tolist()
            sparse[name] = [[q, k, round(float(prompt.weights[layer, head, q, k]), 4)] for q, k in open_pairs]
            if prompt.base_pattern is not None:
                p = prompt.base_pattern[layer, head]
                rows = []
                for q in range(pos):
                    top = p[q, : q + 1].topk(min(DENSE_KEYS_PER_QUERY, q + 1))
                    rows += [[q, int(k), round(float(v), 4)] for v, k in zip(top.values, top.indices)
                             if v >= DENSE_MIN_WEIGHT]
                dense[name] = rows
                dense_counts[name] = pos * (pos + 1) // 2
    density = prompt.per_head.tolist()
    first = max(sparse, key=lambda n: len(sparse[n]))  # the head reading the most keys
    data = {"tokens": prompt.tokens, "n_layers": n_layers, "n_heads": n_heads, "density": density, "sparse": sparse,
            "dense": dense or None, "dense_counts": dense_counts, "first": first}
    panels = '<div class="panel"><h2>sparse: open gates, weight A = P * M</h2><svg id="sparse"></svg></div>'
    if dense:
        panels += (f'<div class="panel"><h2>dense base: pattern P (strongest {DENSE_KEYS_PER_QUERY} keys per query, '
                   f'P &ge; {DENSE_MIN_WEIGHT})</h2><svg id="dense"></svg></div>')
    body = (f'<div id="heads"></div><div id="selected"></div><div class="panels">{panels}</div>')
    note = (f"{pos} tokens; choose a head (its share of open causal pairs); keys on the left, queries on the right; "
            "hover a token to see its edges.")
    return _page(title, note, body, data, _ATTENTION_JS)


def circuit_html(panels: list[tuple[str, object, float | None]], *, title: str) -> str:
    """The page of one or more component circuits: [(label, graph.Graph with its circuit, F or None)]."""
    data = {"panels": []}
    for i, (label, graph, faithfulness) in enumerate(panels):
        edges = [{"name": e.name, "parent": e.parent, "child": e.child, "score": float(e.score)}
                 for e in graph.edges(in_graph_only=True)]
        nodes = [n.name for n in graph.nodes() if n.in_graph]
        data["panels"].append({"id": f"circuit{i}", "label": label, "n_layers": graph.n_layers,
                               "n_heads": graph.n_heads, "parallel": graph.parallel_attn_mlp, "nodes": nodes,
                               "edges": edges, "faithfulness": faithfulness})
    note = ("edges blue where patching them lowers the metric (they carry the clean behaviour), red where it raises "
            "it; width by |score|; click a node to keep only its edges lit, again to show all; hover an edge for its score.")
    return _page(title, note, '<div class="panels" id="panels"></div>', data, _CIRCUIT_JS)
