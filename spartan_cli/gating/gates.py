"""Gate parameterisations: logits, training samples, deterministic masks and the density term.

The default kind is the paper's (Draye et al., arXiv 2512.05865; reference code hrpan/splash_attention):
1. The gate logit is the head's own scaled attention score plus a fixed constant:
   g_ij = q_i . k_j / sqrt(d_head) + b   (no new parameters; b > 0 so most gates start open).
2. Training: logistic noise l = log(u) - log(1 - u), u ~ U(0, 1); the forward uses the hard sample
   M = 1[g + l > 0], an exact Bernoulli(sigmoid(g)) draw; the backward is straight-through with the
   gradient of sigmoid(g + l) (temperature 1).
3. Inference and every measurement: M = 1[g > 0].
4. The sparsity term is the mean of sigmoid(g) over allowed (causal, unpadded) pairs, per sequence and head.
All of this runs in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GateKind:
    """One gate parameterisation. ``logits`` maps fp32 scaled scores (batch, heads, q, k) to gate logits."""

    name: str
    description: str

    def logits(self, scores: torch.Tensor, bias: float) -> torch.Tensor:
        return scores + bias  # (batch, n_heads, q_pos, k_pos), fp32

    def sample(self, g: torch.Tensor, *, generator=None) -> torch.Tensor:
        """Hard Bernoulli(sigmoid(g)) sample with a straight-through sigmoid(g + l) gradient.

        ``generator``: one torch.Generator for the whole tensor, or a sequence of them, one per batch row
        (the noise of a row then depends only on its own generator: distributed.py, step 2)."""
        u = uniform(g, generator)  # (batch, n_heads, q_pos, k_pos)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        noisy = g + (torch.log(u) - torch.log1p(-u))  # g + logistic noise
        soft = torch.sigmoid(noisy)
        hard = (noisy > 0).to(g.dtype)
        return hard + (soft - soft.detach())  # value: hard; gradient: d sigmoid(g + l)

    def deterministic(self, g: torch.Tensor) -> torch.Tensor:
        return g > 0  # bool (batch, n_heads, q_pos, k_pos)

    def open_probability(self, g: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(g)


def uniform(like: torch.Tensor, generator=None) -> torch.Tensor:
    """U(0, 1) noise shaped like ``like`` from one generator, or row by row from one generator per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(like.shape, device=like.device, dtype=like.dtype, generator=generator)
    assert len(generator) == like.shape[0], (len(generator), like.shape)
    return torch.stack([torch.rand(like.shape[1:], device=like.device, dtype=like.dtype, generator=gen)
                        for gen in generator])


GATE_KINDS: dict[str, GateKind] = {
    "paper": GateKind("paper", "g = q.k/sqrt(d) + b, hard-concrete straight-through, mask after softmax"),
}


def gate_kind(name: str) -> GateKind:
    from spartan_cli.errors import ConfigError

    try:
        return GATE_KINDS[name]
    except KeyError:
        raise ConfigError(f"gate kind {name!r} is unknown; choose one of {', '.join(sorted(GATE_KINDS))}") from None
