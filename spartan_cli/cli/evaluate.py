"""``spartan evaluate CKPT_OR_MODEL``: sparse CE and task metrics side by side with the base model."""

from __future__ import annotations

import sys

import click

from spartan_cli.tasks import task_names


class StageProgress:
    """Renders progress.Progress records on stderr.

    On a terminal: a transient rich bar per stage (a spinner for one-off steps such as loading), cleared
    at the end so an error stays the only line. Elsewhere (logs, CI): a plain line per tenth of each
    batched stage; one-off steps print nothing.
    """

    def __init__(self, *, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress = None
        self.task = None
        self.stage = None

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def __call__(self, rec) -> None:
        if self.quiet:
            return
        new = rec.stage != self.stage
        self.stage = rec.stage
        if self.progress is not None:
            if new:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task(rec.stage, total=rec.total, completed=rec.done)
            else:
                self.progress.update(self.task, completed=rec.done)
        elif rec.total is not None and (rec.done == rec.total or rec.done % max(1, rec.total // 10) == 0):
            print(f"{rec.stage}: {rec.done}/{rec.total}", file=sys.stderr, flush=True)


def quiet_loading() -> None:
    """transformers' per-load weight bars add nothing to our own "loading ..." line; keep stderr to one line per stage."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def command_line() -> str:
    return " ".join(["spartan"] + sys.argv[1:])


@click.command("evaluate")
@click.argument("model")
@click.option("--data", default=None, help="Text to measure CE on, every block (.txt/.jsonl/.parquet, folder, hub "
              "dataset). Default: the checkpoint's own held-out blocks (built-ins: addition's held-out problems, "
              "shakespeare's held-out plays).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Tokens per block for --data [the checkpoint's, else 128].")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in jsonl/parquet rows.")
@click.option("--task", default=None, help=f"Task metrics too: {', '.join(task_names())} [built-ins: addition -> addition, shakespeare -> induction].")
@click.option("--baseline", default=None, help="Base model to compare with [the checkpoint's base_model].")
@click.option("--no-baseline", is_flag=True, help="Score only MODEL.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Write evaluate.json here.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--max-batches", type=click.IntRange(min=1), default=None, help="Measure CE on at most N batches per model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Blocks per batch.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
def command(model, data, seq_len, text_field, task, baseline, no_baseline, out, as_json, max_batches, batch_size,
            device, trust_remote_code, quiet):
    """Cross-entropy and perplexity of MODEL (a spartan checkpoint, with deterministic gates, or any HF
    model) on held-out data, and task metrics, side by side with the base model it came from.

    \b
    Examples:
      spartan evaluate runs/addition
      spartan evaluate runs/gpt2 --data ./valid.txt --max-batches 50 --json
      spartan evaluate gpt2 --data ./valid.txt
    """
    from spartan_cli.measure.evaluate import evaluate_run, EvaluateConfig
    from spartan_cli.measure.report import make_report, write_report

    quiet_loading()
    cfg = EvaluateConfig(model=model, data=data, seq_len=seq_len, text_field=text_field, task=task, baseline=baseline,
                         compare_base=not no_baseline, batch_size=batch_size, max_batches=max_batches, device=device,
                         trust_remote_code=trust_remote_code)
    with StageProgress(quiet=quiet) as progress:
        run = evaluate_run(cfg, on_progress=progress)
    report = make_report("evaluate", command=command_line(), config=run.config, metrics=run.result.to_dict())
    if out is not None:
        path = write_report(report, out)
        if not quiet:
            click.echo(f"report written to {path}", err=True)
    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        _print_table(run.result)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [result.model] + ([result.base] if result.base is not None else [])
    table = Table(title="spartan evaluate")
    table.add_column("metric")
    for s in rows:
        kind = "sparse (deterministic gates)" if s.gated else "dense"
        name = s.name if len(s.name) <= 32 else "\u2026" + s.name[-31:]
        table.add_column(f"{kind}\n{name}", justify="right")
    table.add_row("cross-entropy (nats/token)", *[_fmt(s.ce, ".4f") for s in rows])
    table.add_row("perplexity", *[_fmt(s.perplexity, ".3f") for s in rows])
    table.add_row("density", *[_fmt(s.density, ".2%") for s in rows])
    table.add_row("scored tokens", *[f"{s.tokens:,}" for s in rows])
    for metric in rows[0].task.metrics if rows[0].task is not None else ():
        spec = ".2%" if metric.unit == "fraction" else ".4g"
        table.add_row(f"{metric.name} (n={metric.examples:,})",
                      *[_fmt(s.task.value(metric.name) if s.task else None, spec) for s in rows])
    if result.ce_gap is not None:
        table.caption = f"CE gap (sparse - base): {result.ce_gap:+.4f} nats"
    Console().print(table)
