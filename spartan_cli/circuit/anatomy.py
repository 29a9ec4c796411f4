"""Where each architecture keeps the pieces of a decoder block, in the per-head form circuits need.

For circuits a block is: a norm before attention, per-head q/k/v projections, the attention function the
model is configured with (dense, sdpa or spartan's gated one), a per-head output projection, a norm
before the MLP, the MLP, and whether attention and MLP read the same residual (parallel, GPT-NeoX) or
one after the other. ``BlockParts`` holds them with weights reshaped to ``(n_heads, d_head, d_model)``;
grouped-query k/v weights are repeated per query head, so every query head has its own k and v input
and the user never ungroups anything. One ``Anatomy`` per adapter shape (``models.Adapter.shape``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from spartan_cli.errors import ModelError


@dataclass(frozen=True)
class BlockParts:
    """One decoder block, per head. Weights are detached views (copies where GQA repeats k/v)."""

    ln_attn: torch.nn.Module
    ln_mlp: torch.nn.Module
    attn: torch.nn.Module  # the model's attention module: passed to the attention function (gates, flags)
    mlp: torch.nn.Module
    w_q: torch.Tensor  # (n_heads, d_head, d_model)
    w_k: torch.Tensor  # (n_heads, d_head, d_model), repeated per query head under GQA
    w_v: torch.Tensor  # (n_heads, d_head, d_model)
    b_q: torch.Tensor | None  # (n_heads, d_head)
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    w_o: torch.Tensor  # (n_heads, d_head, d_model): head h writes z_h @ w_o[h]
    b_o: torch.Tensor | None  # (d_model,): the shared output bias, not part of any head's output
    rotary: Callable | None  # apply_rotary_pos_emb(q, k, cos, sin) of the model's own module, or None
    parallel: bool  # MLP reads the block input (GPT-NeoX parallel residual), not the post-attention residual


@dataclass(frozen=True)
class Anatomy:
    shape: str
    parts: Callable  # (block, config) -> BlockParts
    final_norm: Callable  # (model) -> the norm applied to the last residual before the unembedding
    parallel: Callable  # (config) -> bool


def _heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """Linear weight (n*d_head, d_model) [out, in] -> (n, d_head, d_model)."""
    return w.detach().view(n, -1, w.shape[-1])


def _bias(b: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if b is None else b.detach().view(n, -1)


def _rotary_of(module) -> Callable:
    return getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")


def _gpt2_parts(block, config) -> BlockParts:
    attn, H = block.attn, config.num_attention_heads
    if getattr(attn, "is_cross_attention", False) or getattr(config, "add_cross_attention", False):
        raise ModelError("GPT-2 models with cross-attention are not supported by circuit discovery")
    w = attn.c_attn.weight.detach()  # Conv1D: (d_model, 3 d_model) [in, out]
    d = w.shape[0]
    w_q, w_k, w_v = (w[:, i * d:(i + 1) * d].T.reshape(H, -1, d) for i in range(3))
    b = attn.c_attn.bias.detach()
    b_q, b_k, b_v = (b[i * d:(i + 1) * d].view(H, -1) for i in range(3))
    w_o = attn.c_proj.weight.detach().view(H, -1, d)  # Conv1D (d_model in, d_model out): rows grouped by head
    return BlockParts(block.ln_1, block.ln_2, attn, block.mlp, w_q, w_k, w_v, b_q, b_k, b_v, w_o,
                      attn.c_proj.bias.detach(), None, False)


def _neox_parts(block, config) -> BlockParts:
    attn, H = block.attention, config.num_attention_heads
    w = attn.query_key_value.weight.detach()  # (3 d_model, d_model); rows per head: [q_h | k_h | v_h]
    d = w.shape[1]
    w = w.view(H, 3, -1, d)
    b = attn.query_key_value.bias
    b = None if b is None else b.detach().view(H, 3, -1)
    w_o = attn.dense.weight.detach().T.reshape(H, -1, d)  # (d_model out, d_model in) -> per head (d_head, d_model)
    b_o = None if attn.dense.bias is None else attn.dense.bias.detach()
    return BlockParts(block.input_layernorm, block.post_attention_layernorm, attn, block.mlp,
                      w[:, 0], w[:, 1], w[:, 2], *(None if b is None else b[:, i] for i in range(3)),
                      w_o, b_o, _rotary_of(attn), bool(block.use_parallel_residual))


def _llama_parts(block, config) -> BlockParts:
    attn = block.self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise ModelError(f"{type(attn).__name__} normalises q/k per head; circuit discovery does not support it yet")
    H = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or H
    group = H // n_kv

    def kv(lin):  # (n_kv * d_head, d_model) -> (H, d_head, d_model): query head h uses kv head h // group
        w = _heads(lin.weight, n_kv).repeat_interleave(group, dim=0)
        b = None if lin.bias is None else _bias(lin.bias, n_kv).repeat_interleave(group, dim=0)
        return w, b

    (w_k, b_k), (w_v, b_v) = kv(attn.k_proj), kv(attn.v_proj)
    d = attn.o_proj.weight.shape[0]
    w_o = attn.o_proj.weight.detach().T.reshape(H, -1, d)
    b_o = None if attn.o_proj.bias is None else attn.o_proj.bias.detach()
    return BlockParts(block.input_layernorm, block.post_attention_layernorm, attn, block.mlp,
                      _heads(attn.q_proj.weight, H), w_k, w_v, _bias(attn.q_proj.bias, H), b_k, b_v,
                      w_o, b_o, _rotary_of(attn), False)


ANATOMIES: dict[str, Anatomy] = {
    "gpt2": Anatomy("gpt2", _gpt2_parts, lambda m: m.transformer.ln_f, lambda c: False),
    "neox": Anatomy("neox", _neox_parts, lambda m: m.gpt_neox.final_layer_norm,
                    lambda c: bool(getattr(c, "use_parallel_residual", True))),
    "llama": Anatomy("llama", _llama_parts, lambda m: m.model.norm, lambda c: False),
}


def anatomy_for(model) -> Anatomy:
    from spartan_cli.hf.models import adapter_for

    shape = adapter_for(model).shape
    try:
        return ANATOMIES[shape]
    except KeyError:
        raise ModelError(f"circuit discovery does not know the {shape!r} block layout; "
                         f"known: {', '.join(sorted(ANATOMIES))}") from None


def parallel_attn_mlp(model) -> bool:
    return anatomy_for(model).parallel(model.config)


def block_parts(model) -> list[BlockParts]:
    from spartan_cli.hf.models import adapter_for

    anatomy = anatomy_for(model)
    return [anatomy.parts(block, model.config) for block in adapter_for(model).blocks(model)]
