"""``spartan circuit CKPT_OR_MODEL --task T``: the task's circuit by edge attribution, and the base model's beside it."""

from __future__ import annotations

import click

from spartan_cli.cli.evaluate import StageProgress, command_line, quiet_loading
from spartan_cli.tasks import task_names

# discovery.METHOD_NAMES and select.SELECTIONS, spelled out so --help imports no torch (a test keeps them equal)
METHOD_CHOICES = ("eap", "eap-ig", "exact")
SELECTION_CHOICES = ("greedy", "topn")
LEVEL_CHOICES = ("component", "token")  # discovery.LEVELS
GATE_GRADIENT_CHOICES = ("hard", "straight-through")  # attribute.GATE_GRADIENTS


@click.command("circuit")
@click.argument("model")
@click.option("--task", default=None, help=f"Task: {', '.join(n for n in task_names() if n != 'custom')}, "
              "custom:FILE (.jsonl, EAP-IG .csv, auto-circuit .json) [built-ins: addition -> addition, shakespeare -> "
              "induction]. A corruption after a colon: ioi:s2|abc|aba, addition:b_units|a_units|a_tens|b_tens|units|"
              "tens|operands; induction:L sets the half length [16].")
@click.option("--method", type=click.Choice(METHOD_CHOICES), default="eap-ig", show_default=True,
              help="Edge attribution: EAP (one backward), EAP-IG on the inputs, or exact (one patched run per "
              "edge: small models only; sees gate switching that gradients miss).")
@click.option("--ig-steps", type=click.IntRange(min=1), default=5, show_default=True, help="EAP-IG integration steps.")
@click.option("--gate-gradient", type=click.Choice(GATE_GRADIENT_CHOICES), default="straight-through",
              show_default=True, help="Gated models, eap/eap-ig, both levels: backward through the deterministic gates: "
              "straight-through (sigmoid'(g), as training; finds smaller faithful circuits) or hard (zero, the "
              "exact derivative); the forward is unchanged.")
@click.option("--n-examples", type=click.IntRange(min=1), default=None, help="Clean/corrupted pairs [the task's default].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Pairs per forward.")
@click.option("--selection", type=click.Choice(SELECTION_CHOICES), default="greedy", show_default=True,
              help="Grow from the logits by score (greedy) or take the best edges anywhere (topn); both pruned.")
@click.option("--faithfulness", type=float, default=0.9, show_default=True,
              help="Report the smallest circuit recovering this share of the clean metric, in (0, 1].")
@click.option("--level", type=click.Choice(LEVEL_CHOICES), default="component", show_default=True,
              help="Graph granularity: components (heads, MLPs), or tokens: nodes at positions, attention edges per "
              "(query, key) pair, only where a gate is open (fixed-layout tasks: addition, greater-than, induction).")
@click.option("--minimize", is_flag=True,
              help="Cut the circuit that reaches --faithfulness by backward elimination (as ACDC prunes): drop its "
              "edges one at a time, lowest |score| first, keeping each drop that leaves F at the level; reports a "
              "circuit no single edge can leave. One patched evaluation per edge and pass.")
@click.option("--evaluate-circuit", "evaluate_circuit", type=click.Path(dir_okay=False), default=None,
              help="Instead of a search: evaluate the circuit in this EAP-IG / MIB graph JSON (or a circuit.json) "
              "on MODEL by edge patching (its faithfulness on the task's pairs); with --compare-base on the base too.")
@click.option("--compare-base", is_flag=True, help="Also find the base model's circuit; one table with both and their ratio.")
@click.option("--baseline", default=None, help="Base model for --compare-base [the checkpoint's base_model].")
@click.option("--seed", type=int, default=0, show_default=True, help="Which pairs the task draws.")
@click.option("--max-delta-mb", type=float, default=512.0, show_default=True,
              help="Cap on the activation-difference buffer per chunk of rows (sources x rows x pos x d_model).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Write report.json, circuit.json, GraphML, DOT, curve CSV/PNG, a picture and circuit.html (component "
              "level: both models' circuits in one page) here (base/ for the base).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def command(model, task, method, ig_steps, gate_gradient, n_examples, batch_size, selection, faithfulness, level, minimize,
            evaluate_circuit, compare_base, baseline, seed, max_delta_mb, out, as_json, device, trust_remote_code,
            quiet):
    """Find MODEL's circuit for a task: score every edge (input, heads with separate q/k/v inputs, MLPs,
    logits) by EAP/EAP-IG, sweep circuit sizes with edge patching, and report the edges and nodes needed
    to reach --faithfulness, the curve, CPR/CMD and the heads carrying most of the score. A spartan
    checkpoint runs with deterministic gates, recomputed in every patched run.

    \b
    Examples:
      spartan circuit runs/addition --compare-base --out runs/addition-circuit
      spartan circuit runs/smollm2 --task ioi --n-examples 64 --method eap --json
      spartan circuit runs/addition --level token --compare-base --out runs/addition-tokens
      spartan circuit runs/addition --task addition:operands --compare-base --minimize
      spartan circuit runs/addition --evaluate-circuit graph.json --compare-base   # an EAP-IG / MIB graph
    """
    from spartan_cli.circuit.driver import CircuitConfig
    from spartan_cli.circuit.run import circuit_run
    from spartan_cli.measure.report import make_report, write_report

    quiet_loading()
    cfg = CircuitConfig(model=model, task=task, method=method, ig_steps=ig_steps, gate_gradient=gate_gradient,
                        n_examples=n_examples, batch_size=batch_size, selection=selection, faithfulness=faithfulness,
                        compare_base=compare_base or baseline is not None, baseline=baseline, seed=seed,
                        max_delta_mb=max_delta_mb, device=device, trust_remote_code=trust_remote_code, level=level,
                        minimize=minimize)
    if evaluate_circuit is not None:
        return _evaluate_file(cfg, evaluate_circuit, out=out, as_json=as_json, quiet=quiet)
    with StageProgress(quiet=quiet) as progress:
        run = circuit_run(cfg, on_progress=progress)
    report = make_report("circuit", command=command_line(), config=run.config, metrics=run.metrics())
    if out is not None:
        from pathlib import Path

        from spartan_cli.circuit.files import plot_curves
        from spartan_cli.circuit.run import write_all

        written = [write_report(report, out, name="report.json")]
        written += write_all(run.model, out, command=command_line(), config=run.config)
        if level == "component":
            written.append(_write_html(run, Path(out) / "circuit.html"))
        if run.base is not None:
            written += write_all(run.base, Path(out) / "base", command=command_line(), config=run.config)
            written.append(plot_curves([run.model, run.base], Path(out) / "curve.png",
                                       title=f"{run.task.get('task')}: sparse vs dense"))
        if not quiet:
            click.echo(f"{len(set(written))} files written to {out}", err=True)
    if as_json:
        click.echo(report.to_json(), nl=False)
    elif level == "token":
        _print_token_tables(run)
    else:
        _print_tables(run)


def _evaluate_file(cfg, path: str, *, out, as_json: bool, quiet: bool) -> None:
    """--evaluate-circuit: the file's circuit evaluated on the model (and base); report.json in --out."""
    from rich.console import Console
    from rich.table import Table

    from spartan_cli.circuit.run import evaluate_circuit_run
    from spartan_cli.measure.report import make_report, write_report

    with StageProgress(quiet=quiet) as progress:
        result = evaluate_circuit_run(cfg, path, on_progress=progress)
    report = make_report("circuit_evaluation", command=command_line(), config={**cfg.to_dict(), "circuit": path},
                         metrics=result)
    if out is not None:
        write_report(report, out, name="report.json")
    if as_json:
        click.echo(report.to_json(), nl=False)
        return
    rows = [r for r in (result["model"], result["base"]) if r is not None]
    table = Table(title=f"spartan circuit --evaluate-circuit {path}: {result['task'].get('task')}, "
                        f"{rows[0]['n_examples']} pairs")
    for col in ("model", "edges / total", "nodes", "F", "metric", "clean / corrupted"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        kind = "sparse" if r["gated"] else "dense"
        table.add_row(f"{kind} {r['model']}", f"{r['edges']:,} / {r['total_edges']:,}", f"{r['nodes']:,}",
                      _fmt(r["faithfulness"], ".3f"), f"{r['metric']:.3g}",
                      f"{r['baselines']['clean']:.3g} / {r['baselines']['corrupted']:.3g}")
    Console().print(table)


def _write_html(run, path):
    """circuit.html: the circuit (and the base model's beside it) drawn in one self-contained page."""
    from spartan_cli.measure.html import circuit_html
    from spartan_cli.training.checkpoint import atomic_write_text

    panels = []
    for r in [run.model] + ([run.base] if run.base is not None else []):
        point = r.summary()["circuit"]
        panels.append((f"{'sparse' if r.gated else 'dense'} {r.name}", r.graph, point["faithfulness"]))
    atomic_write_text(path, circuit_html(panels, title=f"spartan circuit: {run.task.get('task')}"))
    return path


GATES_NOTE = ("deterministic gates 1[g > 0] in attribution and patching, recomputed from the patched q/k in every "
              "patched run")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_tables(run) -> None:
    from rich.console import Console
    from rich.table import Table

    results = [run.model] + ([run.base] if run.base is not None else [])
    level = run.model.level
    table = Table(title=f"spartan circuit: {run.task.get('task')}, {run.config['method']}, {run.config['selection']}, "
                        f"{run.model.n_examples} pairs")
    table.add_column("")
    for r in results:
        kind = "sparse" if r.gated else "dense"
        name = r.name if len(r.name) <= 24 else "\u2026" + r.name[-23:]
        table.add_column(f"{kind}\n{name}", justify="right")
    if run.base is not None:
        table.add_column("dense / sparse", justify="right")

    def row(label, values, ratio=None):
        table.add_row(label, *values, *([] if run.base is None else [ratio or ""]))

    summaries = [r.summary() for r in results]
    how = " (minimized)" if any(s["minimized"] for s in summaries) else ""
    row(f"edges for F >= {level:g}{how}", [_needed(s, "edges") for s in summaries],
        _fmt(run.edge_ratio, ".1f") + "x" if run.edge_ratio else "-")
    row(f"nodes for F >= {level:g}{how}", [_needed(s, "nodes") for s in summaries],
        _fmt(run.node_ratio, ".1f") + "x" if run.node_ratio else "-")
    _sweep_rows(row, summaries, run.task.get("metric", "metric"))
    att = [r.attention for r in results]
    row("attn pairs/prompt, circuit", [_fmt(a and a.circuit, ",.1f") for a in att],
        _ratio_text(att[1].circuit, att[0].circuit) if run.base is not None else None)
    row("attn pairs/prompt, all heads", [_fmt(a and a.all_heads, ",.1f") for a in att],
        _ratio_text(att[1].all_heads, att[0].all_heads) if run.base is not None else None)
    _time_row(row, summaries)
    console = Console()
    console.print(table)
    heads = Table(title="heads by summed |edge score| (* = in the circuit)")
    for r in results:
        heads.add_column(f"{'sparse' if r.gated else 'dense'}: head", justify="left")
        heads.add_column("|score|", justify="right")
    for i in range(max(len(r.top_heads) for r in results)):
        cells = []
        for r in results:
            if i < len(r.top_heads):
                h = r.top_heads[i]
                cells += [h.name + (" *" if h.in_circuit else ""), f"{h.score:.3g}"]
            else:
                cells += ["", ""]
        heads.add_row(*cells)
    console.print(heads)
    if run.model.gated:
        from rich.markup import escape

        console.print(f"[dim]sparse: {escape(GATES_NOTE)}. Attention pairs: (query, key) pairs a head can read "
                      "per prompt (open gates; every causal pair when dense).[/dim]")


def _needed(summary: dict, what: str) -> str:
    total = summary["total_edges"] if what == "edges" else summary["total_nodes"]
    if summary["reached"]:
        return f"{summary[f'{what}_needed']:,} / {total:,}"
    best = summary["best"]
    return f"not reached (best F {best['faithfulness']:.3f} at {best[what]:,})"


def _sweep_rows(row, summaries, metric: str) -> None:
    """The rows both tables read off the sweep: with --minimize the sweep's own circuit (edges, F), then the
    F of the reported circuit, the best F, the clean/corrupted metric and CPR/CMD."""
    if any(s["minimized"] for s in summaries):
        row("  the sweep's circuit (F)", [f"{c['edges']:,} (F {c['faithfulness']:.3f})" if (c := s["sweep_circuit"])
                                          else "-" for s in summaries])
    row("F of that circuit", [_fmt(s["circuit"]["faithfulness"], ".3f") for s in summaries])
    row("best F (edges)", [f"{s['best']['faithfulness']:.3f} ({s['best']['edges']:,})" for s in summaries])
    row(f"clean / corrupt {metric}", [f"{s['baselines']['clean']:.3g} / {s['baselines']['corrupted']:.3g}"
                                      for s in summaries])
    row("CPR / CMD", [f"{s['cpr']:.3f} / {s['cmd']:.3f}" for s in summaries])


def _time_row(row, summaries) -> None:
    """Seconds spent attributing, sweeping (+ refining) and, with --minimize, minimizing."""
    def cell(t):
        text = f"{t['attribution_s']:.1f}s + {t['sweep_s'] + t['refine_s']:.1f}s"
        return text + (f" + {t['minimize_s']:.1f}s" if "minimize_s" in t else "")

    minimizing = any("minimize_s" in s["timing"] for s in summaries)
    row("time: attribute + sweep" + (" + minimize" if minimizing else ""), [cell(s["timing"]) for s in summaries])


def _ratio_text(top, bottom) -> str:
    if top is None or bottom is None:
        return "-"
    return f"{top / bottom:.1f}x" if bottom else "inf"


def _print_token_tables(run) -> None:
    """The token-level table: token edges needed (dense / sparse ratio), what the circuit is made of, its
    component-level summary, and its attention edges by |score|."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    results = [run.model] + ([run.base] if run.base is not None else [])
    summaries = [r.summary() for r in results]
    anatomy = [s["anatomy"] for s in summaries]
    level = run.model.level
    table = Table(title=f"spartan circuit, token level: {run.task.get('task')}, {run.config['method']}, "
                        f"{run.config['selection']}, {run.model.n_examples} pairs")
    table.add_column("")
    for r in results:
        name = r.name if len(r.name) <= 24 else "\u2026" + r.name[-23:]
        table.add_column(f"{'sparse' if r.gated else 'dense'}\n{name}", justify="right")
    if run.base is not None:
        table.add_column("dense / sparse", justify="right")

    def row(label, values, top=None, bottom=None):
        ratio = [] if run.base is None else [_ratio_text(top, bottom) if top is not None else ""]
        table.add_row(label, *values, *ratio)

    base_point = run.base.needed if run.base is not None else None
    model_point = run.model.needed
    how = " (minimized)" if any(s["minimized"] for s in summaries) else ""
    row(f"token edges for F >= {level:g}{how}", [_needed(s, "edges") for s in summaries],
        base_point and base_point.edges, model_point and model_point.edges)
    row(f"token nodes for F >= {level:g}{how}", [_needed(s, "nodes") for s in summaries],
        base_point and base_point.nodes, model_point and model_point.nodes)
    _sweep_rows(row, summaries, run.task.get("metric", "metric"))

    def both(read):  # (dense, sparse) values for the ratio column, or (None, None) without a base model
        return (read(anatomy[1]), read(anatomy[0])) if run.base is not None else (None, None)

    row("  residual / attention edges", [f"{a['residual_edges']:,} / {a['attention_edges']:,}" for a in anatomy],
        *both(lambda a: a["attention_edges"]))
    row("  attention pairs (query, key)", [f"{a['attention_pairs']:,}" for a in anatomy],
        *both(lambda a: a["attention_pairs"]))
    row("  component summary: edges / nodes", [f"{a['component']['edges']:,} / {a['component']['nodes']:,}"
                                              for a in anatomy], *both(lambda a: a["component"]["edges"]))
    row("graph: token edges (attention pairs)", [f"{a['graph']['token_edges']:,} ({a['graph']['attention_pairs']:,})"
                                                for a in anatomy], *both(lambda a: a["graph"]["token_edges"]))
    row("  of which the corruption reaches", [f"{a['graph']['scored_edges']:,}" for a in anatomy],
        *both(lambda a: a["graph"]["scored_edges"]))
    _time_row(row, summaries)
    console = Console()
    console.print(table)
    for r, a in zip(results, anatomy):
        edges = Table(title=f"{'sparse' if r.gated else 'dense'} token circuit: attention edges by |score|")
        for col in ("key -> query", "score", "gate open in"):
            edges.add_column(col, justify="left" if col.startswith("key") else "right")
        for e in a["top_attention_edges"][:12]:
            share = e.get("open_share")
            edges.add_row(f"{e['src']} -> {e['dst']}", f"{e['score']:.3g}", "-" if share is None else f"{share:.0%}")
        positions = ", ".join(f"@{t}: {len(p['heads'])} head nodes, {len(p['attention_edges'])} attention edges"
                              for t, p in a["by_metric_position"].items())
        console.print(edges)
        console.print(f"[dim]into the logits {escape(positions)}[/dim]")
    if run.model.gated:
        console.print(f"[dim]sparse: {escape(run.model.summary()['gates'] or '')}[/dim]")
