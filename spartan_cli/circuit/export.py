"""Circuit files: JSON (docs/circuits.md, "Files", EAP-IG names), GraphML, DOT, the faithfulness curve (CSV, PNG)
and a picture of the circuit. Every file is written to a temp file, then moved in place (os.replace).

``circuit.json`` (``write_circuit`` / ``read_circuit``)::

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

import csv
import io
import json
import math
from pathlib import Path

from spartan_cli.circuit.graph import SCHEMA_VERSION as CIRCUIT_SCHEMA_VERSION
from spartan_cli.errors import DataError

CURVE_FIELDS = ("requested", "edges", "nodes", "metric", "faithfulness", "running_max", "grid")
QKV_COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:purple", "": "tab:gray"}


def _write(path: Path, text: str) -> Path:
    from spartan_cli.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------------------------- JSON
def circuit_dict(result, *, command: str = "", config: dict | None = None) -> dict:
    """circuit.json's object for a discovery.CircuitResult."""
    from spartan_cli import __version__
    from spartan_cli.checkpoint import versions
    from spartan_cli.report import _finite

    header = {"schema_version": CIRCUIT_SCHEMA_VERSION, "spartan_version": __version__, "kind": "circuit_graph",
              "command": command, "config": config or {}, "versions": versions()}
    return _finite({**header, **result.to_dict()})


def write_circuit(result, path, *, command: str = "", config: dict | None = None) -> Path:
    return _write(path, json.dumps(circuit_dict(result, command=command, config=config)) + "\n")


def read_circuit(path):
    """circuit.json -> discovery.CircuitResult (graph with the circuit, curves, summary); a token-level file
    (kind "token_circuit") -> token_discovery.TokenCircuitResult."""
    from spartan_cli.circuit.discovery import CircuitResult

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"circuit file {str(path)!r} does not exist; pass the circuit.json `spartan circuit --out` "
                        "wrote") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if data.get("schema_version") != CIRCUIT_SCHEMA_VERSION:
        raise DataError(f"{path} has schema_version {data.get('schema_version')!r}; this spartan reads "
                        f"{CIRCUIT_SCHEMA_VERSION}: re-run `spartan circuit`")
    try:
        if data.get("kind") == "token_circuit":  # spartan circuit --level token (token_export.py)
            from spartan_cli.circuit.token_discovery import TokenCircuitResult

            return TokenCircuitResult.from_dict(data)
        return CircuitResult.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} lacks {exc}; it was not written by `spartan circuit`") from None


# ------------------------------------------------------------------------------------ GraphML, DOT
def graphml_text(graph) -> str:
    """GraphML of the circuit (nodes and merged q/k/v edges, see graph.to_networkx)."""
    import networkx as nx

    g = nx.DiGraph(to_networkx_circuit(graph))  # a TokenGraph gives its token nodes and edges
    return "\n".join(nx.generate_graphml(g)) + "\n"


def to_networkx_circuit(graph):
    from spartan_cli.circuit.graph import to_networkx
    from spartan_cli.circuit.tokens import TokenGraph, token_networkx

    if isinstance(graph, TokenGraph):
        return token_networkx(graph)

    g = to_networkx(graph, in_graph_only=True)
    for _, _, attrs in g.edges(data=True):  # every edge gets every score key (GraphML keys are global)
        for qkv in "qkv":
            attrs.setdefault(f"score_{qkv}", 0.0)
    return g


def _dot_id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_text(graph, *, title: str = "circuit") -> str:
    """DOT of the circuit: components ranked by layer (input at the bottom, logits on top), one edge per
    head input it feeds (label q/k/v), pen width by |score|; blue where corrupting the edge lowers the
    metric (score < 0: it carries the clean behaviour), red where it raises it. A TokenGraph is drawn by
    token_export.token_dot_text."""
    from spartan_cli.circuit.tokens import TokenGraph

    if isinstance(graph, TokenGraph):
        from spartan_cli.circuit.token_export import token_dot_text

        return token_dot_text(graph, title=title)
    nodes = [n for n in graph.nodes() if n.in_graph]
    edges = graph.edges(in_graph_only=True)
    peak = max((abs(e.score) for e in edges), default=1.0) or 1.0
    shape = {"input": "invhouse", "attn": "ellipse", "mlp": "box", "logits": "house"}
    fill = {"input": "#dddddd", "attn": "#cfe2f3", "mlp": "#fce5cd", "logits": "#dddddd"}
    lines = [f"digraph {_dot_id(title)} {{", "  rankdir=BT;", '  node [style=filled, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=9];']
    ranks: dict[int, list[str]] = {}
    for n in nodes:
        lines.append(f"  {_dot_id(n.name)} [shape={shape[n.kind]}, fillcolor={_dot_id(fill[n.kind])}];")
        if n.layer is not None:
            ranks.setdefault(2 * n.layer + (1 if n.kind == "mlp" and not graph.parallel_attn_mlp else 0),
                             []).append(n.name)
    for _, names in sorted(ranks.items()):
        lines.append("  { rank=same; " + " ".join(_dot_id(x) for x in names) + " }")
    for e in edges:
        colour = "#1f77b4" if e.score <= 0 else "#d62728"
        width = 0.5 + 3.5 * abs(e.score) / peak
        label = f", label={_dot_id(e.qkv)}" if e.qkv else ""
        lines.append(f"  {_dot_id(e.parent)} -> {_dot_id(e.child)} [color={_dot_id(colour)}, "
                     f"penwidth={width:.2f}, tooltip={_dot_id(f'{e.name}: {e.score:.4g}')}{label}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- curve
def curve_csv(result) -> str:
    from spartan_cli.circuit.discovery import curve_rows

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in curve_rows(result):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def plot_curves(results, path, *, title: str = "faithfulness against circuit size") -> Path:
    """F against post-prune edges (log x) for each CircuitResult, the level as a dashed line and the
    circuit each reports marked."""
    from spartan_cli.plots import _figure, _save

    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    level = results[0].level
    for result, colour in zip(results, ("tab:red", "tab:blue", "tab:green", "tab:orange")):
        pts = sorted((p for p in result.refined.points if p.edges > 0), key=lambda p: (p.edges, p.requested))
        kind = "sparse" if result.gated else "dense"
        ax.plot([p.edges for p in pts], [p.faithfulness for p in pts], marker=".", color=colour, lw=1.2,
                label=f"{kind}: {result.name}")
        point = result.needed
        if point is not None:
            ax.plot([point.edges], [point.faithfulness], marker="o", ms=9, mfc="none", color=colour)
            ax.annotate(f"{point.edges} edges", (point.edges, point.faithfulness), textcoords="offset points",
                        xytext=(6, -12), color=colour, fontsize=8)
    ax.axhline(level, ls="--", color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"edges in the circuit (of {results[0].curve.total_edges:,})")
    ax.set_ylabel("normalized faithfulness F")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


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

    from spartan_cli.plots import _figure, _save

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
def write_all(result, out_dir, *, command: str = "", config: dict | None = None) -> list[Path]:
    """circuit.json, circuit.graphml, circuit.dot, curve.csv, curve.png, circuit.png in ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} exists and is not a directory; pass a directory")
    if getattr(result, "kind", "component") == "token":
        from spartan_cli.circuit.token_export import write_token_all

        return write_token_all(result, out, command=command, config=config)
    out.mkdir(parents=True, exist_ok=True)
    kind = "sparse" if result.gated else "dense"
    title = f"{kind} {result.name}: {result.graph.meta.get('task')} circuit"
    return [write_circuit(result, out / "circuit.json", command=command, config=config),
            _write(out / "circuit.graphml", graphml_text(result.graph)),
            _write(out / "circuit.dot", dot_text(result.graph, title=title)),
            _write(out / "curve.csv", curve_csv(result)),
            plot_curves([result], out / "curve.png", title=title),
            plot_circuit(result.graph, out / "circuit.png", title=title)]
