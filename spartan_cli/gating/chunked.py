"""The memory-bounded gated attention: query rows in chunks, recomputed in the backward.

For long sequences the (batch, n_heads, q, k) scores, gate logits and gates of every layer would not fit,
so this path never builds them for all query positions at once:
1. Forward: for each chunk of query rows, ``attention_fused.forward_block`` computes that chunk's scores,
   softmax, gates and output, then drops them. Kept for the backward: q, k, v, and (when gates are
   sampled) the noise generator's state before each chunk; nothing of size q x k.
2. Backward: chunk by chunk, the forward is recomputed (the generator is rewound to the saved state,
   so the same noise and the same gates come back) and ``attention_fused.backward_block`` gives the
   chunk's dq and its contributions to dk and dv.
The maths is the plain path's (``attention_fused``); only the order of summation differs. Selected by
``attention.gated_attention_forward`` when a call's fp32 score tensor would exceed ``GateState.chunk_mb``.
"""

from __future__ import annotations

import dataclasses

import torch

from spartan_cli.gating.fused import Gating, Masks, backward_blocks, run_blocks


def rows_per_chunk(q, k, chunk_mb: float) -> int:
    """Query rows per chunk so one chunk's fp32 (batch, n_heads, rows, k) tensor stays under ``chunk_mb``."""
    batch, n_heads, _, _ = q.shape
    per_row = 4 * batch * n_heads * k.shape[2]  # bytes of one query row of scores
    return max(1, int(chunk_mb * 2**20) // per_row)


def _generators(gating: Gating, device) -> list | None:
    """The generator(s) the noise comes from, made explicit so their states can be saved and restored."""
    if not gating.sample:
        return None
    gen = gating.generator
    if gen is None:
        if device.type == "cuda":
            return [torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]]
        return [torch.default_generator]
    return [gen] if isinstance(gen, torch.Generator) else list(gen)


def _restored(gens: list, states: list) -> list:
    out = []
    for gen, state in zip(gens, states):
        clone = torch.Generator(device=gen.device)
        clone.set_state(state)
        out.append(clone)
    return out


def _run(q, k, v, masks: Masks, scaling: float, gating: Gating, blocks: list, *, keep: bool, gens, single: bool,
         states: list | None = None, restore: list | None = None):
    """``run_blocks`` with each block's noise drawn from ``gens``; their states before each block go to
    ``states``, or, with ``restore``, are set from it first (the backward's recomputation)."""

    def before_block(i):
        if gens is None:
            return gating.generator
        if restore is not None:
            current = _restored(gens, restore[i])
        else:
            states.append([g.get_state() for g in gens])
            current = gens
        return current[0] if single else current

    return run_blocks(q, k, v, masks, scaling, gating, blocks, keep=keep, before_block=before_block)


class ChunkedGatedAttention(torch.autograd.Function):
    """forward(q, k, v, masks, scaling, gating, side, chunk) -> (out (batch, n_heads, q, d_v), density term
    (batch, n_heads)); ``side`` receives open_pairs (and kept logits/pattern, assembled whole on request)."""

    @staticmethod
    def forward(ctx, q, k, v, masks: Masks, scaling: float, gating: Gating, side: dict, chunk: int):
        gens = _generators(gating, q.device)
        single = gating.generator is None or isinstance(gating.generator, torch.Generator)
        blocks = masks.row_blocks(chunk, whole_rows=gating.keep_logits or gating.keep_pattern)
        states: list = []
        with torch.autocast(device_type=q.device.type, enabled=False):
            result = _run(q, k, v, masks, scaling, gating, blocks, keep=False, gens=gens, single=single, states=states)
        side.update(result.side)
        density = result.density_sum / masks.n_allowed if gating.record else torch.zeros(q.shape[:2], device=q.device)
        ctx.save_for_backward(q, k, v, masks.additive, masks.allowed, masks.n_allowed)
        ctx.scaling, ctx.blocks, ctx.single, ctx.states, ctx.gens = scaling, blocks, single, states, gens
        ctx.gating = dataclasses.replace(gating, keep_logits=False, keep_pattern=False)
        ctx.set_materialize_grads(False)
        return result.out, density

    @staticmethod
    def backward(ctx, d_out, d_density):
        q, k, v, additive, allowed, n_allowed = ctx.saved_tensors
        masks = Masks(additive=additive, allowed=allowed, n_allowed=n_allowed, bias=ctx.gating.bias)
        gating = ctx.gating
        d_density = d_density if gating.record else None

        def saved_of(i):  # recompute block i's forward, with the noise it drew in the forward
            rows, keys = ctx.blocks[i]
            return _run(q, k, v, masks, ctx.scaling, gating, [ctx.blocks[i]], keep=True, gens=ctx.gens,
                        single=ctx.single, restore=[ctx.states[i]] if ctx.gens is not None else None).saved[0]

        with torch.autocast(device_type=q.device.type, enabled=False):
            dq, dk, dv = backward_blocks(q, k, v, masks, ctx.scaling, ctx.blocks, saved_of, d_out, d_density)
        return dq, dk, dv, None, None, None, None, None


def chunked_attention(q, k, v, masks: Masks, scaling: float, gating: Gating, *, chunk: int) -> tuple:
    """(out (batch, n_heads, q, d_v), density term (batch, n_heads) or None, side results dict)."""
    side: dict = {}
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, density = ChunkedGatedAttention.apply(q, k, v, masks, scaling, gating, side, chunk)
        return out, (density if gating.record else None), side
    gens = _generators(gating, q.device)
    single = gating.generator is None or isinstance(gating.generator, torch.Generator)
    blocks = masks.row_blocks(chunk, whole_rows=gating.keep_logits or gating.keep_pattern)
    with torch.autocast(device_type=q.device.type, enabled=False):
        result = _run(q, k, v, masks, scaling, gating, blocks, keep=False, gens=gens, single=single, states=[])
    return result.out, (result.density_sum / masks.n_allowed if gating.record else None), result.side
