"""Run a Hugging Face model with every edge of the component graph as a separate wire.

Inside ``wired(model, graph)`` each decoder block's forward is replaced by one that computes the same
function per head (docs/circuits.md, "The component graph"):
1. The block input is the residual stream; at layer 0 it is the ``input`` source (token + position
   embeddings: position terms are equal for clean and corrupted prompts, so they cancel in differences).
2. Each head gets its own residual copy for q, k and v: x (batch, pos, 3 * n_heads, d_model), normed per
   copy and projected with that head's weight slice; GQA k/v weights are repeated per query head.
3. The model's own attention function (dense, sdpa, or the gated one, deterministic in eval mode) mixes
   positions; each head's output z_h @ W_O[h] (batch, pos, n_heads, d_model) is a source. The shared output
   bias is added once, outside every head.
4. The MLP reads its own residual copy (batch, pos, 1, d_model) and its output is a source; the final
   norm's input is the ``logits`` destination.
A ``Tap`` sees every source output and every destination input in forward order and may replace them,
and runs each layer's attention call (``Tap.attend``); attribution and edge patching are taps. Nothing
else changes: on exit the original forwards, the training flag, ``requires_grad`` of every parameter and
any GQA flags are restored, also on error.

Why the block forward is replaced and not hooked: every head needs its own copy of the residual stream for
each of q, k and v (an edge into a3.h1<k> patches that copy alone), and a module hook sees only the one
residual the block's norm and fused projections read. Training never re-wires anything (it only registers
its attention function). The re-wired forward is guarded by parity tests on every supported shape
(GPT-2, GPT-NeoX, Llama, Qwen2 with q/k/v biases, Mistral with a sliding window: ``tests/micro.py``); an
architecture without an ``anatomy`` entry is refused with one line naming the supported ones.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from spartan_cli.circuit.anatomy import BlockParts, anatomy_for, block_parts
from spartan_cli.circuit.graph import Graph
from spartan_cli.errors import ModelError


class Tap:
    """Callbacks of one wired run, in forward order. This base class observes nothing and changes nothing.

    ``source(start, out)``: ``out`` (batch, pos, n, d_model) are sources ``start .. start + n - 1``.
    ``destination(start, x)``: ``x`` (batch, pos, n, d_model) are the inputs of slots ``start .. start + n - 1``.
    Both return the tensor the model goes on with: the argument itself, or a new tensor. Never change the
    argument in place: the head inputs are an expanded view of the residual stream itself.
    """

    def source(self, start: int, out: torch.Tensor) -> torch.Tensor:
        return out

    def destination(self, start: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def attend(self, layer: int, attention: Callable, module, q, k, v, mask, **kwargs) -> torch.Tensor:
        """Layer ``layer``'s attention: q, k, v (batch, n_heads, pos, d_head) after rotary, one k/v per query
        head -> z (batch, pos, n_heads, d_head). ``attention`` is the model's own function (dense, sdpa or
        the gated one) and ``module`` its attention module; token-level patching replaces this call."""
        return attention(module, q, k, v, mask, **kwargs)[0]


@dataclass
class Wiring:
    """A model wired for one graph; ``run`` does one forward with one tap."""

    model: torch.nn.Module
    graph: Graph
    tap: Tap

    def run(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
            tap: Tap | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (batch, pos, vocab) of ``input_ids`` (batch, pos), with ``tap`` (default: none).
        ``logits_to_keep=k`` unembeds only the last k positions (0: all), for runs whose logits go unread."""
        self.tap = tap or Tap()
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              logits_to_keep=logits_to_keep).logits
        finally:
            self.tap = Tap()

    def record(self, input_ids: torch.Tensor, *, tap: Tap, attention_mask: torch.Tensor | None = None) -> None:
        """One forward for ``tap`` alone: the base model up to the final norm, no unembedding (a run whose
        logits go unread, e.g. the corrupted run of attribution, skips the vocabulary-sized matmul)."""
        self.tap = tap
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.tap = Tap()


class _OneStreamHeadInputs(torch.autograd.Function):
    """q, k, v (batch, pos, n_heads, d_head) of every head when all 3 * n_heads input copies x
    (batch, pos, 3 * n_heads, d_model) are the residual stream itself (a run that watches gradients but
    patches nothing). The forward norms and projects the stream once, with the values of the unwatched path;
    the backward still gives every copy its own gradient: per-head projection gradients, then the norm's
    backward batched over copies. That gradient is laid out slot-major (a permuted view of
    (3 * n_heads, batch, pos, d_model)), so a tap contracting it per slot reads it without a copy."""

    @staticmethod
    def forward(ctx, x, norm, w_q, w_k, w_v):
        stream = x[:, :, 0]  # (batch, pos, d_model)
        ctx.norm = norm
        ctx.save_for_backward(stream, w_q, w_k, w_v)
        normed = norm(stream)
        return tuple(torch.einsum("btd,hed->bthe", normed, w) for w in (w_q, w_k, w_v))

    @staticmethod
    def backward(ctx, *grads):  # each (batch, pos, n_heads, d_head)
        stream, *weights = ctx.saved_tensors
        (B, T, D), H = stream.shape, weights[0].shape[0]
        g_normed = stream.new_empty(3, H, B * T, D)  # dM/d norm(copy), slot-major
        for i, (g, w) in enumerate(zip(grads, weights)):
            torch.bmm(g.reshape(B * T, H, -1).transpose(0, 1), w, out=g_normed[i])  # (H, BT, d_head) @ (H, d_head, D)
        g_x = _norm_backward_per_copy(ctx.norm, stream, g_normed.view(3 * H, B, T, D))
        return g_x.permute(1, 2, 0, 3), None, None, None, None


def _norm_backward_per_copy(norm, stream: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dM/d(copy) of ``norm`` applied to copies of ``stream`` (batch, pos, d_model), given dM/d norm(copy)
    ``grad`` (copies, batch, pos, d_model). torch's LayerNorm uses its own backward kernel on a contiguous
    stack of copies (3-4x faster than batching rules); any other norm (RMSNorm variants) maps the norm's
    vector-Jacobian product over the copies."""
    if type(norm) is torch.nn.LayerNorm:
        shape = list(norm.normalized_shape)
        _, mean, rstd = torch.ops.aten.native_layer_norm(stream, shape, norm.weight, norm.bias, norm.eps)
        copies = grad.shape[:1] + stream.shape
        stats = grad.shape[:1] + mean.shape
        return torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), stream.expand(copies).contiguous(), shape, mean.expand(stats).contiguous(),
            rstd.expand(stats).contiguous(), norm.weight, norm.bias, [True, False, False])[0]
    _, norm_vjp = torch.func.vjp(norm, stream)
    return torch.vmap(norm_vjp)(grad)[0]


def _interface(attn) -> Callable:
    """The attention function the model is configured with (as its own attention module would pick it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def _block_forward(wiring: Wiring, parts: BlockParts, layer: int, signature: inspect.Signature):
    graph = wiring.graph
    H = graph.n_heads
    head_src, mlp_src = graph.head_source(layer), graph.mlp_source(layer)
    head_slot, mlp_slot = graph.head_slot(layer), graph.mlp_slot(layer)
    attention = _interface(parts.attn)
    extra = {}
    if getattr(parts.attn, "sliding_window", None) is not None:
        extra["sliding_window"] = parts.attn.sliding_window

    def forward(hidden_states, *args, **kwargs):
        tap = wiring.tap
        arguments = signature.bind(hidden_states, *args, **kwargs).arguments
        mask = arguments.get("attention_mask")
        resid = hidden_states  # (batch, pos, d_model)
        B, T, D = resid.shape
        if layer == 0:
            resid = tap.source(0, resid.unsqueeze(2)).squeeze(2)

        # 2. per-head q/k/v inputs
        shared = resid[:, :, None, :].expand(B, T, 3 * H, D)
        x = tap.destination(head_slot, shared)  # (batch, pos, 3 * n_heads, d_model)
        if x is shared and not x.requires_grad:  # nothing patched or watched: norm once
            normed = parts.ln_attn(resid)  # (batch, pos, d_model)
            q, k, v = (torch.einsum("btd,hed->bthe", normed, w) for w in (parts.w_q, parts.w_k, parts.w_v))
        elif x is shared:  # watched but not patched: norm once, still one gradient per copy
            q, k, v = _OneStreamHeadInputs.apply(x, parts.ln_attn, parts.w_q, parts.w_k, parts.w_v)
        else:
            normed = parts.ln_attn(x).view(B, T, 3, H, D).unbind(dim=2)  # unbind: no zero-filled grads per slice
            q, k, v = (torch.einsum("bthd,hed->bthe", n, w)
                       for n, w in zip(normed, (parts.w_q, parts.w_k, parts.w_v)))  # each (batch, pos, n_heads, d_head)
        if parts.b_q is not None:
            q, k, v = q + parts.b_q, k + parts.b_k, v + parts.b_v
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, n_heads, pos, d_head)
        if parts.rotary is not None:
            cos, sin = arguments["position_embeddings"]
            q, k = parts.rotary(q, k, cos, sin)

        # 3. the model's attention function, then per-head outputs
        z = tap.attend(layer, attention, parts.attn, q, k, v, mask, dropout=0.0, scaling=parts.attn.scaling, **extra)
        heads = torch.einsum("bthe,hed->bthd", z.reshape(B, T, H, -1), parts.w_o)  # (batch, pos, n_heads, d_model)
        heads = tap.source(head_src, heads)
        attn_out = heads.sum(dim=2)
        if parts.b_o is not None:
            attn_out = attn_out + parts.b_o

        # 4. MLP
        mid = resid if parts.parallel else resid + attn_out
        x_mlp = tap.destination(mlp_slot, mid.unsqueeze(2)).squeeze(2)  # (batch, pos, d_model)
        mlp_out = tap.source(mlp_src, parts.mlp(parts.ln_mlp(x_mlp)).unsqueeze(2)).squeeze(2)
        return mid + mlp_out + (attn_out if parts.parallel else 0.0)

    return forward


@contextmanager
def wired(model, graph: Graph | None = None):
    """Context manager: ``model`` wired for ``graph`` (default: its full graph); yields a ``Wiring``.

    The model runs in eval mode (a gated model's gates are deterministic, 1[g > 0], and are recomputed
    from the patched q/k in every patched run) with parameters frozen (no weight gradients).
    """
    from spartan_cli.hf.models import adapter_for, model_shape

    graph = Graph.from_model(model) if graph is None else graph
    shape, anatomy = model_shape(model), anatomy_for(model)
    want = (shape.n_layers, shape.n_heads, anatomy.parallel(model.config))
    if want != (graph.n_layers, graph.n_heads, graph.parallel_attn_mlp):
        raise ModelError(f"the circuit graph has {graph.n_layers} layers x {graph.n_heads} heads "
                         f"(parallel={graph.parallel_attn_mlp}) but the model has {want[0]} x {want[1]} "
                         f"(parallel={want[2]}); build the graph with Graph.from_model(model)")
    blocks = adapter_for(model).blocks(model)
    wiring = Wiring(model, graph, Tap())
    with ExitStack() as stack:
        was_training = model.training
        stack.callback(model.train, was_training)
        model.eval()
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        stack.callback(lambda: [p.requires_grad_(f) for p, f in zip(params, flags)])
        for p in params:
            p.requires_grad_(False)
        for layer, (block, parts) in enumerate(zip(blocks, block_parts(model))):
            if hasattr(parts.attn, "num_key_value_groups"):  # k/v arrive per query head: nothing to repeat
                stack.callback(setattr, parts.attn, "num_key_value_groups", parts.attn.num_key_value_groups)
                parts.attn.num_key_value_groups = 1
            own = block.__dict__.get("forward")  # an instance-level forward someone else set, kept as is
            stack.callback(_restore_forward, block, own)
            block.forward = _block_forward(wiring, parts, layer, inspect.signature(block.forward))

        def logits_input(_module, args):
            x = wiring.tap.destination(graph.logits_slot, args[0].unsqueeze(2)).squeeze(2)
            return (x, *args[1:])

        handle = anatomy.final_norm(model).register_forward_pre_hook(logits_input)
        stack.callback(handle.remove)
        yield wiring


def _restore_forward(block, own) -> None:
    if own is None:
        block.__dict__.pop("forward", None)
    else:
        block.forward = own
