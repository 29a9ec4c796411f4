"""Live progress on stderr (rich): a bar on a terminal, one plain line per logged step otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def _fmt_step(rec) -> str:
    held = ""
    if rec.heldout_ce is not None:
        held = f" | held-out CE {rec.heldout_ce:.4f} density {rec.heldout_density:.2%}"
    kl = "" if rec.kl is None else f" | KL {rec.kl:.4f} vs slack {rec.slack:.4f}"
    return (f"step {rec.step} | CE {rec.ce:.4f} vs target {rec.tau:.4f}{kl} | density {rec.density:.2%} | "
            f"beta {rec.beta:.3g} | {rec.tokens_per_s:,.0f} tok/s | ETA {rec.eta_s:,.0f}s{held}")


class TrainProgress:
    """Context manager; ``on_step`` takes train.StepRecord, ``say`` takes a status line."""

    def __init__(self, total_steps: int, *, quiet: bool = False):
        self.console = Console(stderr=True)
        self.total = total_steps
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress = Progress(
            TextColumn("[bold]sparsify"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console, transient=False,
        ) if self.live else None
        self.task = None

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def say(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]{message}[/dim]") if self.live else print(message, file=sys.stderr, flush=True)

    def on_step(self, rec) -> None:
        line = _fmt_step(rec)
        if self.progress is not None:
            short = (f"CE {rec.ce:.3f}/{rec.tau:.3f} dens {rec.density:.1%} beta {rec.beta:.3g} "
                     f"{rec.tokens_per_s:,.0f} tok/s")
            self.progress.update(self.task, completed=rec.step, description=short)
            if rec.heldout_ce is not None:
                self.progress.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)
