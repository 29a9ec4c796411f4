"""What a long computation is doing, handed to an ``on_progress`` callback (the CLI draws it; ``cli.progress``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """What a long evaluation is doing; handed to ``on_progress``."""

    stage: str  # e.g. "CE of runs/addition"
    done: int  # batches done in this stage
    total: int | None  # batches in this stage, None for a one-off step (loading)
