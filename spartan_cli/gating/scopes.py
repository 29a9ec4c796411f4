"""Context managers for temporary changes to a gated model; each restores what was there, also on error."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from spartan_cli.gating.attention import gate_states


@contextmanager
def _set(model, **changes):
    states = gate_states(model)
    saved = [{k: getattr(s, k) for k in changes} for s in states]
    try:
        for s in states:
            for k, v in changes.items():
                setattr(s, k, v(s) if callable(v) else v)
        yield states
    finally:
        for s, old in zip(states, saved):
            for k, v in old.items():
                setattr(s, k, v)


def gates_open(model):
    """Every gate forced open: the model computes exactly its dense attention."""
    return _set(model, forced=lambda s: torch.ones(s.n_heads, dtype=torch.bool))


def dense_view(model):
    """Every gate forced open and nothing recorded, the gate statistics of the last forward kept: a forward of
    the dense model in the middle of a gated step (the LoRA student as its own teacher)."""
    return _set(model, forced=lambda s: torch.ones(s.n_heads, dtype=torch.bool), record=False,
                stats=lambda s: s.stats)


def heads_shut(model, heads: dict[int, list[int]]):
    """Gates of the given heads ({layer: [head, ...]}) forced shut; every other gate forced open."""

    def forced(s):
        mask = torch.ones(s.n_heads, dtype=torch.bool)
        mask[heads.get(s.layer, [])] = False
        return mask

    return _set(model, forced=forced)


def deterministic_gates(model):
    """Gates are 1[g > 0] even while the model is in training mode."""
    return _set(model, stochastic=False)


def recording(model):
    """Each forward stores GateStats (density term, open-gate counts) on every layer's state."""
    return _set(model, record=True, stats=None)


def keeping_gate_logits(model, *, pattern: bool = False):
    """Each forward stores the gate logits g (and, with ``pattern``, the softmax pattern P) per layer."""
    return _set(model, keep_gate_logits=True, gate_logits=None, keep_pattern=pattern, pattern=None)


@contextmanager
def evaluating(model):
    """model.eval() for the duration, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def no_dropout(model):
    """Every dropout module's p set to 0 (post-training compares its CE with an eval-mode target)."""
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in drops]
    try:
        for m in drops:
            m.p = 0.0
        yield model
    finally:
        for m, p in zip(drops, saved):
            m.p = p
