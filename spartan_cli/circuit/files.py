"""What both circuit levels write: circuit.json's envelope, the curve (CSV, PNG), and the file set.

Every file is written to a temp file, then moved in place (os.replace): a crash leaves the old file or
the new one, never half of one. ``write_files`` writes one result's set, given its level's GraphML, DOT
and picture writers (``export`` for components, ``token_export`` for tokens): circuit.json,
circuit.graphml, circuit.dot, curve.csv, curve.png, circuit.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Callable

from spartan_cli.circuit.graph import SCHEMA_VERSION as CIRCUIT_SCHEMA_VERSION

CURVE_FIELDS = ("requested", "edges", "nodes", "metric", "faithfulness", "running_max", "grid")


def write_text(path: Path, text: str) -> Path:
    """``text`` into ``path`` atomically (a temp file, then os.replace), its folder made."""
    from spartan_cli.training.checkpoint import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def dot_id(name: str) -> str:
    """A DOT identifier: ``name`` quoted, backslashes and quotes escaped."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def curve_csv(result) -> str:
    from spartan_cli.circuit.driver import curve_rows

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in curve_rows(result):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buf.getvalue()


def plot_curves(results, path, *, title: str = "faithfulness against circuit size") -> Path:
    """F against post-prune edges (log x) for each result (either level), the level as a dashed line and the
    circuit each reports marked."""
    from spartan_cli.measure.plots import _figure, _save

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


def result_dict(result, *, kind: str, command: str = "", config: dict | None = None) -> dict:
    """circuit.json's object: the envelope (schema_version, spartan_version, ``kind``, command, config,
    versions), then ``result.to_dict()``; non-finite floats become null."""
    from spartan_cli import __version__
    from spartan_cli.training.checkpoint import versions
    from spartan_cli.measure.report import _finite

    header = {"schema_version": CIRCUIT_SCHEMA_VERSION, "spartan_version": __version__, "kind": kind,
              "command": command, "config": config or {}, "versions": versions()}
    return _finite({**header, **result.to_dict()})


def write_files(result, out_dir, *, kind: str, what: str, graphml: Callable, dot: Callable, picture: Callable,
                command: str = "", config: dict | None = None) -> list[Path]:
    """One result's file set in ``out_dir``; ``graphml(graph)`` and ``dot(graph, title=)`` give text,
    ``picture(graph, path, title=)`` draws circuit.png; ``kind`` is circuit.json's, ``what`` names the
    circuit in titles ("circuit", "token circuit")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{'sparse' if result.gated else 'dense'} {result.name}: {result.graph.meta.get('task')} {what}"
    text = json.dumps(result_dict(result, kind=kind, command=command, config=config)) + "\n"
    return [write_text(out / "circuit.json", text),
            write_text(out / "circuit.graphml", graphml(result.graph)),
            write_text(out / "circuit.dot", dot(result.graph, title=title)),
            write_text(out / "curve.csv", curve_csv(result)),
            plot_curves([result], out / "curve.png", title=title),
            picture(result.graph, out / "circuit.png", title=title)]
