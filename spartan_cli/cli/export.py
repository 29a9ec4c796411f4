"""``spartan export SOURCE --format F --out PATH``: a checkpoint or a circuit in a format other tools read."""

from __future__ import annotations

import json

import click

from spartan_cli.exports import FORMATS

FORMAT_HELP = "\n".join(f"  {name:<9} {FORMATS[name].help} [source: {FORMATS[name].source}]" for name in FORMATS)


@click.command("export", epilog="\b\nFormats:\n" + FORMAT_HELP)
@click.argument("source")
@click.option("--format", "-f", "fmt", type=click.Choice(list(FORMATS)), required=True,
              help="What to write (see Formats below). hf/dense-hf/masks read a checkpoint directory; "
                   "graphml/dot/json/eap-ig/png/svg read the circuit.json of `spartan circuit --out` (or its folder).")
@click.option("--out", "-o", required=True, type=click.Path(), help="Directory (hf, dense-hf) or file to write.")
@click.option("--prompt", "prompts", multiple=True, help="masks: export this text's masks (repeatable) instead of a dataset.")
@click.option("--data", default=None, help="masks: text to cut into blocks [the checkpoint's held-out blocks].")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="masks with --data: tokens per block.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet rows.")
@click.option("--max-sequences", type=click.IntRange(min=1), default=None, help="masks: at most N sequences.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="masks: blocks per forward.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr.")
def command(source, fmt, out, prompts, data, seq_len, text_field, max_sequences, batch_size, device, overwrite,
            as_json, quiet):
    """Write SOURCE (a checkpoint directory, or a circuit.json) as --format F to --out.

    \b
    Examples:
      spartan export runs/gpt2 --format hf --out exported/gpt2-sparse
      spartan export runs/gpt2 --format dense-hf --out exported/gpt2-dense   # no gates: loses the sparsity
      spartan export runs/addition --format masks --prompt "53+21=00074" --out masks.jsonl
      spartan export runs/addition-circuit/circuit.json --format graphml --out circuit.graphml
      spartan export runs/addition-circuit --format eap-ig --out graph.json   # EAP-IG / MIB Graph.from_json
    """
    from spartan_cli.cli.evaluate import quiet_loading
    from spartan_cli.exports import ExportConfig, export

    if FORMATS[fmt].source == "checkpoint":
        quiet_loading()
    cfg = ExportConfig(source=source, format=fmt, out=out, prompts=tuple(prompts), data=data, seq_len=seq_len,
                       text_field=text_field, max_sequences=max_sequences, batch_size=batch_size, device=device,
                       overwrite=overwrite)
    from spartan_cli.cli.evaluate import StageProgress

    with StageProgress(quiet=quiet) as progress:
        result = export(cfg, on_progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(f"wrote {result.out} ({fmt})", err=True)
