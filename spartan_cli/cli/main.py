"""``spartan`` entry point: a lazy click group (``spartan --help`` imports neither torch nor transformers).

Every user error becomes one line on stderr and exit code 1: SpartanError from the library, and click's
own usage errors (bad option values, missing arguments), which click would otherwise print with usage.
"""

from __future__ import annotations

import importlib
import sys

import click

from spartan_cli import __version__
from spartan_cli.errors import SpartanError

# name -> (module, short help); modules are imported only when their command runs or shows help
COMMANDS = {
    "sparsify": ("spartan_cli.cli.sparsify", "Post-train a model to sparse attention (gated attention + GECO)."),
    "evaluate": ("spartan_cli.cli.evaluate", "CE, perplexity and task metrics of a checkpoint beside its base model."),
    "density": ("spartan_cli.cli.density", "Attention density per layer/head, keys read per query, pictures."),
    "circuit": ("spartan_cli.cli.circuit", "A task's circuit by edge attribution and patching; dense vs sparse side by side."),
    "export": ("spartan_cli.cli.export", "Write a checkpoint (hf, dense-hf, masks) or a circuit (graphml, dot, json, png, svg) for other tools."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spartan")
def cli():
    """spartan: post-train transformer LMs to extremely sparse attention, measure it, find task circuits."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="spartan", standalone_mode=False)
    except SpartanError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    if isinstance(rv, int) and rv:
        sys.exit(rv)


if __name__ == "__main__":
    main()
