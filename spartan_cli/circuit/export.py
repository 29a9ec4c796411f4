"""Component circuit files: JSON (docs/circuits.md, "Files", EAP-IG names), GraphML, DOT and a picture of the
circuit; the curve and the envelope are ``files``'.

``circuit.json`` (``run.write_all`` / ``run.read_circuit``)::

    schema_version   CIRCUIT_SCHEMA_VERSION (= graph.SCHEMA_VERSION, so EAP-IG-style readers and
                     ``Graph.from_json`` read the file as is)
    spartan_version, kind ("circuit_graph"), command, config, versions      what made it
    cfg       {n_layers, n_heads, parallel_attn_mlp, model, task, metric, method, ig_steps, seed,
               n_examples, selection, gated, gates, corruption, bos}
    nodes     {"input" | "a{l}.h{h}" | "m{l}" | "logits": {in_graph, score}}   score = summed |edge score|
    edges     {"a0.h1->a2.h3<k>" | "m1->logits" | ...: {score, in_graph}}      every edge; in_graph = circuit
    curve     [{requested, edges, nodes, metric, faithfulness, grid, running_max}]  by requested size
    baselines {clean, corrupted}                                           m(full), m(empty)
    summary   level, reached, edges_needed, nodes_needed, faithfulness_at, circuit, best, minimized,
              sweep_circuit, cpr, cmd, top_heads, attention_edges, timing (see discovery.CircuitResult.summary);
              with ``minimized`` true, ``circuit`` and the edges/nodes needed are the minimized circuit's and
              ``sweep_circuit`` the sweep's before elimination
Scores are EAP/EAP-IG estimates of m(edge patched to corrupted) - m(clean), signed (corrupted - clean).

``circuit.graphml``: the circuit's nodes and edges (networkx ``to_networkx``: one edge per node pair with
its q/k/v slots in ``qkv``). ``circuit.dot``: one edge per slot, written by hand (no pygraphviz needed;
``dot -Tsvg circuit.dot``). ``curve.csv``/``curve.png``: F against post-prune edges, one line per model.
``circuit.png``: components in layer rows, edges coloured by sign and q/k/v, width by |score|.
"""

from __future__ import annotations

from pathlib import Path

from spartan_cli.circuit.files import dot_id, write_files

QKV_COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:purple", "": "tab:gray"}


# ------------------------------------------------------------------------------------ GraphML, DOT
def graphml_text(graph) -> str:
    """GraphML of the circuit (nodes and merged q/k/v edges, see graph.to_networkx)."""
    import networkx as nx

    g = nx.DiGraph(to_networkx_circuit(graph))
    return "\n".join(nx.generate_graphml(g)) + "\n"


def to_networkx_circuit(graph):
    """The circuit's networkx DiGraph (``graph.to_networkx``) with every score key on every edge."""
    from spartan_cli.circuit.graph import to_networkx

    g = to_networkx(graph, in_graph_only=True)
    for _, _, attrs in g.edges(data=True):  # every edge gets every score key (GraphML keys are global)
        for qkv in "qkv":
            attrs.setdefault(f"score_{qkv}", 0.0)
    return g


def dot_text(graph, *, title: str = "circuit") -> str:
    """DOT of the circuit: components ranked by layer (input at the bottom, logits on top), one edge per
    head input it feeds (label q/k/v), pen width by |score|; blue where corrupting the edge lowers the
    metric (score < 0: it carries the clean behaviour), red where it raises it."""
    nodes = [n for n in graph.nodes() if n.in_graph]
    edges = graph.edges(in_graph_only=True)
    peak = max((abs(e.score) for e in edges), default=1.0) or 1.0
    shape = {"input": "invhouse", "attn": "ellipse", "mlp": "box", "logits": "house"}
    fill = {"input": "#dddddd", "attn": "#cfe2f3", "mlp": "#fce5cd", "logits": "#dddddd"}
    lines = [f"digraph {dot_id(title)} {{", "  rankdir=BT;", '  node [style=filled, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=9];']
    ranks: dict[int, list[str]] = {}
    for n in nodes:
        lines.append(f"  {dot_id(n.name)} [shape={shape[n.kind]}, fillcolor={dot_id(fill[n.kind])}];")
        if n.layer is not None:
            ranks.setdefault(2 * n.layer + (1 if n.kind == "mlp" and not graph.parallel_attn_mlp else 0),
                             []).append(n.name)
    for _, names in sorted(ranks.items()):
        lines.append("  { rank=same; " + " ".join(dot_id(x) for x in names) + " }")
    for e in edges:
        colour = "#1f77b4" if e.score <= 0 else "#d62728"
        width = 0.5 + 3.5 * abs(e.score) / peak
        label = f", label={dot_id(e.qkv)}" if e.qkv else ""
        lines.append(f"  {dot_id(e.parent)} -> {dot_id(e.child)} [color={dot_id(colour)}, "
                     f"penwidth={width:.2f}, tooltip={dot_id(f'{e.name}: {e.score:.4g}')}{label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- curve


# ------------------------------------------------------------------------------------------ picture
def layout(graph) -> dict[str, tuple[float, float]]:
    """Positions of every node: a row per layer (heads, then the MLP one row up unless attention and
    MLP run in parallel), input at the bottom and logits at the top, each row centred."""
    pos: dict[str, tuple[float, float]] = {"input": (0.0, 0.0)}
    H = graph.n_heads
    for layer in range(graph.n_layers):
        y_attn = 1 + 2 * layer
        for h in range(H):
            pos[f"a{layer}.h{h}"] = (h - (H - 1) / 2, y_attn)
        pos[f"m{layer}"] = ((H + 1) / 2, y_attn) if graph.parallel_attn_mlp else (0.0, y_attn + 1)
    pos["logits"] = (0.0, 2 * graph.n_layers + 1)
    return pos


def plot_circuit(graph, path, *, title: str = "circuit") -> Path:
    """The circuit drawn with matplotlib (no graphviz): kept nodes dark, others faint; one line per kept
    edge, coloured by the head input it feeds (q/k/v, grey for MLP and logits inputs), width by |score|.
    Scores estimate m(edge corrupted) - m(clean): edges carrying the clean behaviour score < 0 and are
    drawn solid; dotted edges are those whose corruption raises the metric."""
    from matplotlib.collections import LineCollection

    from spartan_cli.measure.plots import _figure, _save

    pos = layout(graph)
    nodes = graph.nodes()
    edges = graph.edges(in_graph_only=True)
    peak = max((abs(e.score) for e in edges), default=1.0) or 1.0
    width = max(6.0, 0.55 * graph.n_heads + 3.0)
    fig = _figure(min(width, 24.0), min(max(4.0, 0.9 * graph.n_layers + 2.0), 30.0))
    ax = fig.add_subplot()
    for sign, style in ((-1, "solid"), (1, "dotted")):
        for qkv, colour in QKV_COLOURS.items():
            chosen = [e for e in edges if (e.qkv or "") == qkv and (e.score > 0) == (sign > 0)]
            if not chosen:
                continue
            segments = [(pos[e.parent], _port(pos[e.child], e.qkv)) for e in chosen]
            widths = [0.4 + 3.0 * abs(e.score) / peak for e in chosen]
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=widths, linestyles=style,
                                             alpha=0.7, zorder=1))
    for n in nodes:
        x, y = pos[n.name]
        marker = {"input": "s", "attn": "o", "mlp": "s", "logits": "s"}[n.kind]
        ax.scatter([x], [y], s=260 if n.in_graph else 90, marker=marker, zorder=2,
                   color=("#f6b26b" if n.kind == "mlp" else "#6fa8dc") if n.in_graph else "#eeeeee",
                   edgecolors="black" if n.in_graph else "#cccccc", linewidths=0.6)
        if n.in_graph or graph.n_heads <= 8:
            ax.annotate(n.name, (x, y), ha="center", va="center", fontsize=6 if n.kind == "attn" else 7,
                        color="black" if n.in_graph else "#aaaaaa", zorder=3)
    for qkv, colour in QKV_COLOURS.items():
        ax.plot([], [], color=colour, label=qkv or "mlp/logits")
    ax.plot([], [], color="black", ls="dotted", label="corrupting it raises\nthe metric")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title}\n{graph.n_edges} edges, {graph.n_nodes} nodes", fontsize=9)
    ax.set_axis_off()
    ax.autoscale_view()
    ax.margins(0.08)
    return _save(fig, path)


def _port(xy: tuple[float, float], qkv: str | None) -> tuple[float, float]:
    """Where an edge ends on its node: q/k/v inputs enter a head side by side, below its centre."""
    x, y = xy
    offset = {"q": -0.18, "k": 0.0, "v": 0.18}.get(qkv or "", 0.0)
    return (x + offset, y - 0.12)


# --------------------------------------------------------------------------------------------- all


def write_component_files(result, out_dir, *, command: str = "", config: dict | None = None) -> list[Path]:
    """circuit.json, circuit.graphml, circuit.dot, curve.csv, curve.png, circuit.png of a CircuitResult."""
    return write_files(result, out_dir, kind="circuit_graph", what="circuit", graphml=graphml_text, dot=dot_text,
                       picture=plot_circuit, command=command, config=config)
