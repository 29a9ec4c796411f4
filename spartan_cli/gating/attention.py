"""Gated attention, registered with the transformers attention-function interface.

transformers routes GPT-2, GPT-NeoX, Llama, Qwen2, OLMo... attention through ``ALL_ATTENTION_FUNCTIONS``;
``attach_gates`` registers ``gated_attention_forward`` under the name ``"spartan"`` and points the
model's config at it, so every attention module of the model calls it with its own q, k, v.

The forward, per layer (docs/method.md):
1. s = q k^T * scaling in fp32, with the model's causal/padding mask (keys a query may not see).
2. P = softmax(s) over the allowed keys only: the mask never enters the softmax, so P equals the
   dense model's attention pattern.
3. Gate logits g = s + b; gates M are sampled (training), 1[g > 0] (inference), or forced (scopes).
4. A = P * M, no renormalisation: rows may sum to < 1 and a row with every gate shut outputs 0.
5. y = A v.
Each module's ``GateState`` (a plain attribute, not a parameter) carries the gate config, any forced
override, and, when recording, the per-(sequence, head) density term and open-gate counts of the last call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spartan_cli.gating.fused import Gating, Masks, fused_attention
from spartan_cli.gating.tiled import tile_shape, tiled_attention
from spartan_cli.config import GateConfig
from spartan_cli.gating.gates import gate_kind

ATTN_IMPLEMENTATION = "spartan"
STATE_ATTR = "spartan_gate"
# MiB: a call whose fp32 scores (batch, n_heads, q, k) would be larger runs tiled (memory linear in T, recomputing
# in the backward; one tile's scores about this much). GateState.chunk_mb / attach_gates(chunk_mb=) change it.
CHUNK_MB = 64.0


@dataclass
class GateStats:
    """What one gated forward measured, per sequence and head."""

    density_term: torch.Tensor  # (batch, n_heads) mean sigmoid(g) over allowed pairs, differentiable
    open_pairs: torch.Tensor  # (batch, n_heads) count of 1[g > 0] over allowed pairs, no grad
    allowed_pairs: torch.Tensor  # (batch, 1) count of allowed (causal, unpadded) pairs


@dataclass
class GateState:
    """Per-attention-module gate state. Changed only through the context managers in ``scopes``."""

    cfg: GateConfig
    layer: int
    n_heads: int
    forced: torch.Tensor | None = None  # (n_heads,) or (batch, n_heads, q, k) bool: override of M
    stochastic: bool = True  # sample gates when the module is training
    record: bool = False  # store GateStats of each call in ``stats``
    stats: GateStats | None = None
    keep_gate_logits: bool = False  # store g (batch, n_heads, q, k) in ``gate_logits`` (density, plots)
    gate_logits: torch.Tensor | None = None
    keep_pattern: bool = False  # store P (softmax pattern, before gating) in ``pattern``
    pattern: torch.Tensor | None = None
    chunk_mb: float = CHUNK_MB  # calls with larger fp32 scores take the tiled path (choose_path)
    generator: object = field(default=None, repr=False)  # a torch.Generator, or one per batch row (gates.uniform)


def allowed_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean (batch or 1, 1, q_len, k_len) mask of the keys each query may attend to."""
    if attention_mask is None:
        # Causal, no padding; queries are the last q_len positions of the k_len keys (KV cache).
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        return (k_pos <= q_pos)[None, None]  # (1, 1, q_len, k_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    # additive float mask (eager convention): 0 where allowed, a very negative number where not
    return attention_mask[..., :k_len] > torch.finfo(attention_mask.dtype).min / 2


def gated_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function transformers calls: query (batch, n_heads, q, d_head), key/value
    (batch, n_kv_heads, k, d_head). Returns (output (batch, q, n_heads, d_head), A (batch, n_heads, q, k))."""
    state: GateState | None = getattr(module, STATE_ATTR, None)
    if state is None:  # loaded by plain from_pretrained (an `export --format hf` directory): no attach_gates call
        state = state_from_config(module, query.shape[1])
    n_heads, n_kv = query.shape[1], key.shape[1]
    if n_kv != n_heads:  # grouped-query attention: gates are per query head
        key = key.repeat_interleave(n_heads // n_kv, dim=1)
        value = value.repeat_interleave(n_heads // n_kv, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, k_len = query.shape[2], key.shape[2]
    dropout = dropout if module.training else 0.0
    name = choose_path(state, query.shape, k_len, dropout=dropout)
    # (batch|1, 1, q, k) bool; the tiled path builds a causal mask tile by tile (None: no q x k tensor at all)
    allowed = None if name == "tiled" and attention_mask is None else allowed_mask(attention_mask, q_len, k_len,
                                                                                   query.device)
    return ATTENTION_PATHS[name](module, state, query, key, value, allowed, scaling, dropout)


def choose_path(state: GateState, query_shape, k_len: int, *, dropout: float = 0.0) -> str:
    """Which registered path computes a call: the autograd reference for attention dropout or gate kinds
    without a hand-written path, the tiled path (memory linear in T) when the fp32 scores (batch, n_heads, q, k)
    would exceed ``GateState.chunk_mb``, else the fused one (also when whole g or P are kept: they are q x k
    by definition). Every path computes the same maths."""
    if dropout > 0.0 or state.cfg.kind not in FUSED_KINDS:
        return "reference"
    if state.keep_gate_logits or state.keep_pattern:
        return "fused"
    batch, n_heads, q_len = query_shape[:3]
    scores_mb = 4 * batch * n_heads * q_len * k_len / 2**20
    return "tiled" if scores_mb > state.chunk_mb else "fused"


def forced_gates(state: GateState, device) -> torch.Tensor | None:
    """The gates a scope forces (``state.forced``), broadcastable to (batch, n_heads, q, k) bool, or None."""
    if state.forced is None:
        return None
    forced = state.forced.to(device)
    return forced.view(1, -1, 1, 1) if forced.dim() == 1 else forced  # per head, or per pair


def gate_logits(state: GateState, scores: torch.Tensor) -> torch.Tensor:
    """g for the scores s = q.k * scaling (batch, n_heads, q, k): the gate kind's logits, s + b for the paper's."""
    return gate_kind(state.cfg.kind).logits(scores, state.cfg.bias)


def gates(state: GateState, g: torch.Tensor, allowed: torch.Tensor, *, sample: bool = False) -> torch.Tensor:
    """M for the gate logits g (``gate_logits``), fp32 0/1 on the allowed pairs: forced by a scope, else
    sampled (training: ``sample``, the state's generators), else deterministic 1[g > 0]. The one gate rule
    of the reference attention, token-level patching and attribution; the fused paths compute the same
    from ``Gating`` (``_gating``)."""
    forced = forced_gates(state, g.device)
    if forced is not None:
        return (forced & allowed).to(g.dtype)
    kind = gate_kind(state.cfg.kind)
    if sample:
        return kind.sample(g, generator=state.generator) * allowed
    return (kind.deterministic(g) & allowed).to(g.dtype)


def soft_gates(state: GateState, g: torch.Tensor) -> torch.Tensor:
    """sigmoid(g) (the gate kind's open probability) for the gate logits g: what the density term averages
    and what the straight-through gradient differentiates."""
    return gate_kind(state.cfg.kind).open_probability(g)


def reference_attention(module, state: GateState, query, key, value, allowed, scaling, dropout):
    """The gated attention as a composition of torch ops, differentiated by autograd: the definition the
    fused and chunked paths are tested against, and the path for attention dropout (training outside the
    trainer, which turns dropout off) and for gate kinds without a hand-written backward."""
    with torch.autocast(device_type=query.device.type, enabled=False):  # gate maths stays fp32 under autocast
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (batch, n_heads, q, k)
    neg = torch.finfo(scores.dtype).min
    pattern = torch.softmax(scores.masked_fill(~allowed, neg), dim=-1)  # P, (batch, n_heads, q, k)
    kind = gate_kind(state.cfg.kind)
    g = gate_logits(state, scores)  # (batch, n_heads, q, k) fp32
    mask = gates(state, g, allowed, sample=module.training and state.stochastic)

    if state.record:
        n_allowed = allowed.sum(dim=(-1, -2)).clamp_min(1).to(scores.dtype)  # (batch|1, 1)
        prob = soft_gates(state, g).masked_fill(~allowed, 0.0)
        state.stats = GateStats(
            density_term=prob.sum(dim=(-1, -2)) / n_allowed,  # (batch, n_heads)
            open_pairs=(kind.deterministic(g.detach()) & allowed).sum(dim=(-1, -2)),
            allowed_pairs=n_allowed.detach().expand(query.shape[0], 1),  # (batch, 1)
        )
    if state.keep_gate_logits:
        state.gate_logits = g.detach().masked_fill(~allowed, float("-inf"))
    if state.keep_pattern:
        state.pattern = pattern.detach()

    weights = (pattern * mask).to(value.dtype)  # A = P * M, no renormalisation
    if dropout > 0.0:
        weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
    output = torch.matmul(weights, value)  # (batch, n_heads, q, d_head)
    return output.transpose(1, 2).contiguous(), weights


def _gating(module, state: GateState, device) -> Gating:
    forced = forced_gates(state, device)
    forced = None if forced is None else forced.to(torch.float32)
    return Gating(bias=state.cfg.bias, sample=forced is None and module.training and state.stochastic,
                  forced=forced, generator=state.generator, record=state.record,
                  keep_logits=state.keep_gate_logits, keep_pattern=state.keep_pattern)


def _record(state: GateState, density, side: dict, n_allowed: torch.Tensor, batch: int) -> None:
    """Store what a hand-written path measured on the state (GateStats, kept g and P)."""
    if state.record:
        state.stats = GateStats(density_term=density, open_pairs=side["open_pairs"],
                                allowed_pairs=n_allowed.expand(batch, 1))  # (batch, 1)
    if state.keep_gate_logits:
        state.gate_logits = side["gate_logits"]
    if state.keep_pattern:
        state.pattern = side["pattern"]


def fused_path(module, state: GateState, query, key, value, allowed, scaling, dropout):
    """All query rows at once, in blocks of rows (``fused``); keeps 4 bytes per pair of sampled gates."""
    gating = _gating(module, state, query.device)
    masks = Masks.from_allowed(allowed, state.cfg.bias)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.float(), key.float()  # (batch, n_heads, q|k, d_head) fp32
    out, density, side = fused_attention(q, k, value, masks, scaling, gating)
    _record(state, density, side, masks.n_allowed, query.shape[0])
    return out.transpose(1, 2).contiguous(), None  # A is never built whole (like sdpa: no attention weights)


def tiled_path(module, state: GateState, query, key, value, allowed, scaling, dropout):
    """(query block, key block) tiles, recomputed in the backward (``tiled``): nothing of size q x k kept."""
    gating = _gating(module, state, query.device)
    with torch.autocast(device_type=query.device.type, enabled=False):
        q, k = query.float(), key.float()
    out, density, side = tiled_attention(q, k, value, allowed, scaling, gating, tile=tile_shape(q, k, state.chunk_mb))
    _record(state, density, side, side["n_allowed"], query.shape[0])
    return out.transpose(1, 2).contiguous(), None


# gate kinds the fused and tiled paths implement (their backward is written out for these kinds' maths)
FUSED_KINDS = frozenset({"paper"})

# name -> path(module, state, query, key, value, allowed, scaling, dropout) -> (output (batch, q, n_heads, d_v), A)
ATTENTION_PATHS = {
    "reference": reference_attention,
    "fused": fused_path,
    "tiled": tiled_path,
}


def state_from_config(module, n_heads: int) -> GateState:
    """The GateState of an attention module whose model was loaded without ``attach_gates``: the gate
    config from ``config.spartan_gate`` (written by attach_gates), deterministic gates 1[g > 0] even in
    training mode (no sampling without spartan's trainer). Built on the first forward and kept on the module."""
    from spartan_cli.errors import ModelError

    gate = getattr(getattr(module, "config", None), "spartan_gate", None)
    if gate is None:
        raise ModelError(f"{type(module).__name__} runs attn_implementation {ATTN_IMPLEMENTATION!r} but its config "
                         "has no spartan_gate; export the model with `spartan export --format hf` or call attach_gates")
    state = GateState(cfg=GateConfig.from_dict(gate), layer=int(getattr(module, "layer_idx", 0) or 0),
                      n_heads=n_heads, stochastic=False)
    setattr(module, STATE_ATTR, state)
    return state


def register() -> None:
    """Register the gated attention (and its boolean mask builder) with transformers. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, gated_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attach_gates(model, cfg: GateConfig | None = None, *, chunk_mb: float = CHUNK_MB):
    """Gate every attention module of ``model`` (in place) and return it.

    The gate config is also written into ``model.config.spartan_gate`` so a saved model says how it was gated.
    ``chunk_mb``: calls whose fp32 scores would exceed this many MiB take the tiled path.
    """
    if not chunk_mb > 0:
        from spartan_cli.errors import ConfigError

        raise ConfigError(f"chunk_mb must be > 0 MiB, got {chunk_mb!r}")
    from spartan_cli.hf.models import adapter_for, model_shape

    cfg = cfg or GateConfig()
    adapter = adapter_for(model)
    register()
    n_heads = model_shape(model).n_heads
    for layer, module in enumerate(adapter.attention_modules(model)):
        setattr(module, STATE_ATTR, GateState(cfg=cfg, layer=layer, n_heads=n_heads, chunk_mb=chunk_mb))
    model.config.spartan_gate = cfg.to_dict()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def gate_states(model) -> list[GateState]:
    """The GateState of every layer, in layer order; ModelError if the model is not gated."""
    from spartan_cli.errors import ModelError
    from spartan_cli.hf.models import adapter_for

    states = [getattr(m, STATE_ATTR, None) for m in adapter_for(model).attention_modules(model)]
    if any(s is None for s in states):
        raise ModelError("the model has no attention gates; load a spartan checkpoint or call attach_gates first")
    return states


def is_gated(model) -> bool:
    """Whether ``model`` runs spartan's gated attention (attach_gates / a loaded checkpoint)."""
    return getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
