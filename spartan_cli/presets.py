"""Run-config defaults that a built-in model brings (applied below the config file and the flags)."""

from __future__ import annotations

import copy

# The addition model: 11-token problems, only the 5 answer digits scored; base CE is near 0, so the
# target carries a small tolerance, and the multiplier moves fast enough to finish in minutes on 2 cores.
ADDITION = {
    "train": {"steps": 2000, "batch_size": 256, "lr": 1e-3, "lr_warmup_steps": 50, "schedule": "cosine",
              "tolerance": 0.01, "eval_every": 250, "checkpoint_every": 500, "log_every": 25},
    "geco": {"beta_init": 1e-3, "warmup_steps": 50, "rate": 0.5, "max_log_step": 0.05, "smoothing": 0.95},
    "gate": {"bias": 2.0},
}

PRESETS = {"addition": ADDITION}


def preset_for(model: str | None) -> dict:
    return copy.deepcopy(PRESETS.get(model or "", {}))
