"""Token-level circuit files: circuit.json, GraphML, DOT, the curve, and a picture over positions.

``circuit.json`` (kind "token_circuit"; ``run.read_circuit`` reads it back as a TokenCircuitResult)::

    schema_version, spartan_version, kind, command, config, versions
    cfg          {n_layers, n_heads, parallel_attn_mlp, level: "token", n_pos, metric_positions, gated,
                  gate_policy, model, task, metric, method, ig_steps, seed, n_examples, selection, ...}
    nodes, edges the component-level summary (EAP-IG names): u -> v is in the circuit when some
                 (u, t) -> (v, t) residual edge is; its score sums theirs
    token_edges  every token edge: {"src": "a0.h1@3", "dst": "a2.h0<k>@3", "type": "residual", "score",
                 "in_graph"} and {"src": "a2.h0:k@3", "dst": "a2.h0@9", "type": "attn", "gate": 1 (gated;
                 null when dense), "open_share": share of prompts whose gate is open, "score", "in_graph"}
    curve, baselines, summary   as at component level; summary.anatomy reads the circuit off (component
                 summary, top attention edges, heads and attention edges per metric position)
Scores estimate m(edge patched to corrupted) - m(clean), means over prompts per (edge, position).
``circuit.graphml``: token nodes (kind, layer, head, pos, qkv) and circuit edges (type, qkv, score).
``circuit.dot``: nodes ranked by layer stage (key/value inputs, heads, MLP), attention edges coloured by k/v.
``circuit.png``: positions across, layers up; attention edges as arcs from key to query position.
"""

from __future__ import annotations

from pathlib import Path

from spartan_cli.circuit.files import dot_id, write_files

KV_COLOURS = {"k": "tab:green", "v": "tab:purple", "q": "tab:blue", "": "tab:gray"}


def _stage(graph, name: str) -> float:
    """Vertical place of a node: input 0; per layer l key/value inputs 3l+1, heads 3l+2, MLP 3l+3; logits top."""
    from spartan_cli.circuit.tokens import _node_parts

    node = name.split("@")[0]
    if node == "input":
        return 0.0
    if node == "logits":
        return 3.0 * graph.component.n_layers + 1
    layer, _, qkv = _node_parts(name)
    if node.startswith("m"):
        return 3.0 * layer + (2 if graph.component.parallel_attn_mlp else 3)
    return 3.0 * layer + (1 if qkv else 2)


def token_graphml_text(graph) -> str:
    import networkx as nx

    from spartan_cli.circuit.tokens import token_networkx

    return "\n".join(nx.generate_graphml(token_networkx(graph))) + "\n"


def token_dot_text(graph, *, title: str = "token circuit") -> str:
    from spartan_cli.circuit.tokens import token_networkx

    g = token_networkx(graph)
    peak = max((abs(a["score"]) for _, _, a in g.edges(data=True)), default=1.0) or 1.0
    shape = {"input": "invhouse", "attn": "ellipse", "mlp": "box", "kv": "diamond", "logits": "house"}
    lines = [f"digraph {dot_id(title)} {{", "  rankdir=BT;", '  node [style=filled, fontname="Helvetica", '
             'fontsize=9, fillcolor="#eeeeee"];', '  edge [fontname="Helvetica", fontsize=8];']
    ranks: dict[float, list[str]] = {}
    for name, attrs in g.nodes(data=True):
        lines.append(f"  {dot_id(name)} [shape={shape[attrs['kind']]}];")
        ranks.setdefault(_stage(graph, name), []).append(name)
    for _, names in sorted(ranks.items()):
        lines.append("  { rank=same; " + " ".join(dot_id(x) for x in sorted(names, key=_pos)) + " }")
    for u, v, a in g.edges(data=True):
        colour = KV_COLOURS[a["qkv"]] if a["type"] == "attn" else ("#1f77b4" if a["score"] <= 0 else "#d62728")
        style = "bold" if a["type"] == "attn" else "solid"
        lines.append(f"  {dot_id(u)} -> {dot_id(v)} [color={dot_id(colour)}, style={style}, "
                     f"penwidth={0.5 + 3.5 * abs(a['score']) / peak:.2f}, tooltip={dot_id(a['label'])}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _pos(name: str) -> int:
    return int(name.rsplit("@", 1)[1])


def plot_token_circuit(graph, path, *, title: str = "token circuit") -> Path:
    """Positions across, layer stages up; heads of one layer side by side inside a position's column."""
    from matplotlib.collections import LineCollection

    from spartan_cli.circuit.tokens import _node_parts, token_networkx
    from spartan_cli.measure.plots import _figure, _save

    g = token_networkx(graph)
    H = graph.component.n_heads

    def xy(name):
        layer, head, qkv = _node_parts(name)
        offset = 0.0 if head < 0 else (head - (H - 1) / 2) * 0.7 / max(H, 1) + (0.05 if qkv == "v" else 0.0)
        return _pos(name) + offset, _stage(graph, name)

    peak = max((abs(a["score"]) for _, _, a in g.edges(data=True)), default=1.0) or 1.0
    fig = _figure(min(max(6.0, 0.9 * graph.n_pos + 2), 20.0), min(max(4.0, 0.8 * graph.component.n_layers * 3), 24.0))
    ax = fig.add_subplot()
    for kind, colour in (("residual", "tab:gray"), ("k", KV_COLOURS["k"]), ("v", KV_COLOURS["v"])):
        chosen = [(u, v, a) for u, v, a in g.edges(data=True)
                  if (a["type"] == "residual" if kind == "residual" else (a["type"] == "attn" and a["qkv"] == kind))]
        if chosen:
            ax.add_collection(LineCollection([(xy(u), xy(v)) for u, v, _ in chosen], colors=colour, alpha=0.6,
                                             linewidths=[0.4 + 3 * abs(a["score"]) / peak for *_, a in chosen],
                                             zorder=1, label="residual" if kind == "residual" else f"attention ({kind})"))
    colours = {"input": "#bbbbbb", "attn": "#6fa8dc", "mlp": "#f6b26b", "kv": "#b6d7a8", "logits": "#bbbbbb"}
    for kind, colour in colours.items():  # one scatter per kind: a scatter per node costs seconds
        points = [xy(name) for name, attrs in g.nodes(data=True) if attrs["kind"] == kind]
        if points:
            ax.scatter(*zip(*points), s=40, color=colour, edgecolors="black", linewidths=0.4, zorder=2)
    for name, attrs in g.nodes(data=True):
        if attrs["kind"] in ("attn", "mlp", "logits"):
            ax.annotate(name.split("@")[0], xy(name), fontsize=5, xytext=(2, 2), textcoords="offset points")
    ax.set_xticks(range(graph.n_pos))
    ax.set_xlabel("position")
    ax.set_yticks([3 * layer + 2 for layer in range(graph.component.n_layers)],
                  [f"layer {layer}" for layer in range(graph.component.n_layers)])
    ax.set_title(f"{title}\n{graph.n_edges} token edges, {graph.n_nodes} nodes", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.autoscale_view()
    ax.margins(0.05)
    return _save(fig, path)


def write_token_files(result, out_dir, *, command: str = "", config: dict | None = None) -> list[Path]:
    """circuit.json, circuit.graphml, circuit.dot, curve.csv, curve.png, circuit.png of a TokenCircuitResult."""
    return write_files(result, out_dir, kind="token_circuit", what="token circuit", graphml=token_graphml_text,
                       dot=token_dot_text, picture=plot_token_circuit, command=command, config=config)
