"""Held-out measurement of a (gated) model: token-weighted CE and deterministic gate density.

Density (docs/method.md): open deterministic gates 1[g > 0] / allowed (causal, unpadded) pairs, summed over
every held-out sequence, overall and per layer and head. Batched, no grad, eval mode.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from spartan_cli.blocks import TokenBlocks
from spartan_cli.gating.scopes import evaluating, recording


@dataclass(frozen=True)
class Measurement:
    ce: float  # nats per scored token
    tokens: int  # scored tokens
    sequences: int
    open_pairs: torch.Tensor | None  # (n_layers, n_heads) int64, summed over sequences; None if not gated
    allowed_pairs: int  # allowed (query, key) pairs per head, summed over sequences

    @property
    def density(self) -> float | None:
        if self.open_pairs is None:
            return None
        return float(self.open_pairs.sum()) / (self.open_pairs.numel() * max(self.allowed_pairs, 1))

    @property
    def density_per_head(self) -> torch.Tensor | None:
        if self.open_pairs is None:
            return None
        return self.open_pairs.double() / max(self.allowed_pairs, 1)  # (n_layers, n_heads)


def _is_gated(model) -> bool:
    from spartan_cli.gating.attention import ATTN_IMPLEMENTATION

    return getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


@torch.no_grad()
def measure(model, blocks: TokenBlocks, *, batch_size: int = 8, max_batches: int | None = None) -> Measurement:
    """CE and (for gated models) deterministic density of ``model`` on ``blocks``."""
    device = next(model.parameters()).device
    gated = _is_gated(model)
    nll, tokens, seqs, allowed = 0.0, 0, 0, 0
    open_pairs = None
    with evaluating(model), (recording(model) if gated else nullcontext()) as states:
        for i, batch in enumerate(blocks.batches(batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            ids = batch.input_ids.to(device)
            labels = batch.labels.to(device)
            logits = model(input_ids=ids).logits  # (batch, pos, vocab)
            target = labels[:, 1:]
            scored = target != -100
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                reduction="sum",
            )
            nll += float(lp)
            tokens += int(scored.sum())
            seqs += ids.shape[0]
            if gated:
                counts = torch.stack([s.stats.open_pairs.sum(0) for s in states]).cpu()  # (n_layers, n_heads)
                open_pairs = counts if open_pairs is None else open_pairs + counts
                allowed += int(states[0].stats.allowed_pairs.sum())
    return Measurement(ce=nll / max(tokens, 1), tokens=tokens, sequences=seqs, open_pairs=open_pairs,
                       allowed_pairs=allowed)

