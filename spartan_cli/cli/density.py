"""``spartan density CKPT``: how many attention edges a sparse model keeps, and pictures of what it reads."""

from __future__ import annotations

from pathlib import Path

import click

from spartan_cli.cli.evaluate import StageProgress, command_line, quiet_loading

GRAPH_MAX_TOKENS = 64  # the Figure-1 graph is drawn for prompts up to this long


@click.command("density")
@click.argument("ckpt")
@click.option("--data", default=None, help="Text to measure on, every block. Default: the checkpoint's own held-out "
              "blocks (built-ins: addition's held-out problems, shakespeare's held-out plays).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Tokens per block for --data [the checkpoint's, else 128].")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet rows.")
@click.option("--prompt", default=None, help="Also keep this text's attention: open keys per query in the report, "
              "and with --plot one PNG per layer, dense base next to sparse.")
@click.option("--baseline", default=None, help="Dense model for the --prompt pictures [the checkpoint's base_model].")
@click.option("--no-baseline", is_flag=True, help="Draw the sparse model only.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Write density.json (and PNGs) here.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False), default=None,
              help="With --prompt: write one self-contained HTML page of its attention (choose a head; sparse next "
              "to the dense base; hover a token for its edges).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--plot", is_flag=True, help="Write a layer x head heatmap, density by position, and the --prompt pictures to --out.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Measure at most N batches.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Blocks per batch.")
@click.option("--gate-bias", type=float, default=None, help="Plain (untrained) models only: b of the gates attached "
              "to measure their step-0 density [2.0].")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def command(ckpt, data, seq_len, text_field, prompt, baseline, no_baseline, out, html_file, as_json, plot, max_batches,
            batch_size, gate_bias, device, trust_remote_code, quiet):
    """Density of CKPT's deterministic gates (open / causal pairs) overall, per layer and per head; keys
    read per query; heads shut; density by query position.

    \b
    Examples:
      spartan density runs/addition --prompt "53+21=00074" --plot --out runs/addition-density
      spartan density runs/shakespeare --prompt "ROMEO: But soft" --html attention.html
      spartan density runs/gpt2 --json | jq .overall.density
    """
    from spartan_cli.measure.density import DensityConfig, density_run
    from spartan_cli.errors import ConfigError
    from spartan_cli.measure.report import make_report, write_report

    if plot and out is None:
        raise ConfigError("--plot writes PNG files: pass --out DIR to say where")
    if html_file is not None and prompt is None:
        raise ConfigError("--html draws a prompt's attention: pass --prompt TEXT too")
    if html_file is not None and not Path(html_file).expanduser().parent.is_dir():
        raise ConfigError(f"--html {html_file!r}: its folder does not exist; create it or write the page elsewhere")
    quiet_loading()
    cfg = DensityConfig(model=ckpt, data=data, seq_len=seq_len, text_field=text_field, prompt=prompt, baseline=baseline,
                        compare_base=not no_baseline, batch_size=batch_size, max_batches=max_batches,
                        gate_bias=gate_bias, device=device, trust_remote_code=trust_remote_code)
    with StageProgress(quiet=quiet) as progress:
        run = density_run(cfg, on_progress=progress)
    report = make_report("density", command=command_line(), config=run.config, metrics=run.metrics())
    written = []
    if html_file is not None:
        from spartan_cli.measure.html import attention_html
        from spartan_cli.training.checkpoint import atomic_write_text

        atomic_write_text(Path(html_file), attention_html(run.prompt, title=f"spartan density {ckpt}"))
        written.append(Path(html_file))
    if out is not None:
        written.append(write_report(report, out))
        if plot:
            written += _plots(run, Path(out))
    if not quiet:
        for path in written:
            click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        _print_tables(run)


def _plots(run, out: Path) -> list[Path]:
    from spartan_cli.measure import plots

    paths = []
    if run.result is not None:
        paths.append(plots.density_heatmap(run.result, out / "density_heatmap.png"))
        paths.append(plots.density_by_position(run.result, out / "density_by_position.png"))
    if run.prompt is not None:
        paths += plots.attention_patterns(run.prompt, out)
        if len(run.prompt.tokens) <= GRAPH_MAX_TOKENS:
            paths.append(plots.attention_graph(run.prompt, out / "attention_graph.png"))
    return paths


def _print_tables(run) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if run.result is not None:
        d = run.result.to_dict()
        o = d["overall"]
        table = Table(title=f"spartan density: {run.config['model']}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in [("density (open / allowed pairs)", f"{o['density']:.3%}"),
                     ("open / allowed pairs", f"{o['open_pairs']:,} / {o['allowed_pairs']:,}"),
                     ("mean keys read per query", f"{o['mean_keys_per_query']:.3f}"),
                     ("max keys read per query", f"{o['max_keys_per_query']:,}"),
                     ("heads shut entirely", f"{o['heads_shut']} of {o['heads']} ({o['share_heads_shut']:.1%})"),
                     ("queries reading no key", f"{o['share_queries_reading_nothing']:.2%}"),
                     ("sequences x tokens", f"{o['sequences']:,} x {o['seq_len']}"),
                     ("CE (deterministic gates)", f"{o['ce']:.4f}"),
                     ("gates", f"{run.gates['kind']}, b = {run.gates['bias']} ({run.gates['source']})")]:
            table.add_row(k, v)
        console.print(table)
        heads = Table(title="density per head (rows: layers)")
        heads.add_column("layer")
        n_heads = len(d["per_head"]["density"][0])
        for h in range(n_heads):
            heads.add_column(f"h{h}", justify="right")
        heads.add_column("layer", justify="right")
        heads.add_column("keys/query", justify="right")
        for layer, row in enumerate(d["per_head"]["density"]):
            pl = d["per_layer"][layer]
            heads.add_row(str(layer), *[f"{v:.1%}" for v in row], f"{pl['density']:.2%}", f"{pl['mean_keys_per_query']:.2f}")
        console.print(heads)
    if run.prompt is not None:
        p = run.prompt.to_dict()
        console.print(f"prompt: {len(p['tokens'])} tokens, density {p['density']:.2%}")
