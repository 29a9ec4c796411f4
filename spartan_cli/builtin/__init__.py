"""Built-in models shipped with spartan, each a module with the same four functions.

``addition``: the paper's two-digit addition toy. ``shakespeare``: a small pretrained language model.
Every module has ``load_model(dtype=)`` -> (model, tokenizer), ``splits()`` -> the post-training data,
``heldout_blocks()`` -> what ``evaluate`` measures CE on, and ``task_metrics(model)`` -> the numbers of
its own task that ``sparsify`` reports.
"""

from __future__ import annotations

import importlib

NAMES = ("addition", "shakespeare")


def module(name: str):
    """The module of built-in model ``name`` (one of ``NAMES``)."""
    assert name in NAMES, name
    return importlib.import_module(f"spartan_cli.builtin.{name}")
