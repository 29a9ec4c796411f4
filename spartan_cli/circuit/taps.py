"""The taps every circuit computation runs the wired model with (docs/circuits.md), component or token level.

- ``Record``: the corrupted run; every source output into the activation-difference buffer ``delta``
  (n_sources, rows, pos, d_model). Sources lead the buffer so that ``delta[:prev]`` is contiguous.
- ``Patch``: a clean run in which every source subtracts its own output, delta[u] -= a_u, and every
  destination v reads x_v + sum over parents u with (u -> v) missing of delta[u]. Sources fire in forward
  order, so delta[u] is final before any reader uses it: edges outside the circuit carry corrupted
  values, edges inside carry the values of this intervened run. The missing weights may have a position
  axis (token circuits).
- ``Gradients``: a clean (or interpolated) run whose backward adds delta . dM/dx_v at every destination:
  EAP and EAP-IG scores, summed over positions or kept per position.
- ``GATE_GRADIENTS``: what the backward passes through a gated model's deterministic gates M = 1[g > 0],
  whose derivative is zero. ``hard``: nothing (the exact derivative). ``straight-through``: as training
  does, dM/dg = sigmoid'(g) (at g itself, without noise): each gated layer's output gets a term
  sum_j P_ij (s_ij - s_ij.detach()) v_j, s = sigmoid(g), which is exactly zero but carries P * sigmoid'(g)
  into q and k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from spartan_cli.circuit.contrast import Contrast, Metric, chunks
from spartan_cli.circuit.curve import Evaluation, EvaluationStep
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.wiring import Tap, wired
from spartan_cli.errors import ConfigError

DEFAULT_MAX_DELTA_MB = 512.0


@dataclass(frozen=True)
class AttributionStep:
    """Progress of an attribution: examples scored so far."""

    method: str
    examples: int


class Record(Tap):
    """Stores every source output into ``delta`` (n_sources, rows, pos, d_model): the corrupted run.

    Sources lead the buffer so that ``delta[:prev]`` is contiguous: the score and patch products then
    read it in place instead of copying it for every destination."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta

    def source(self, start, out):
        self.delta[start:start + out.shape[2]] = out.permute(2, 0, 1, 3)
        return out


class Gradients(Tap):
    """A run with gradients: optionally subtracts this run's sources from ``delta``, optionally replaces the
    input, and at every destination adds delta . gradient to ``scores`` during the backward pass: summed
    over positions into (n_forward, n_backward), or kept per position in (n_forward, n_backward, pos) for
    token circuits. ``gate_term(module, q, k, v, mask, scaling)`` adds a zero-valued term to each layer's
    output for the backward through the gates (``GATE_GRADIENTS``)."""

    def __init__(self, graph: Graph, delta, scores, *, subtract: bool, input: torch.Tensor | None = None,
                 gate_term: Callable | None = None):
        self.graph, self.delta, self.scores = graph, delta, scores
        self.subtract, self.input, self.gate_term = subtract, input, gate_term

    def attend(self, layer, attention, module, q, k, v, mask, **kwargs):
        z = attention(module, q, k, v, mask, **kwargs)[0]  # (batch, pos, n_heads, d_head)
        term = None if self.gate_term is None else self.gate_term(module, q, k, v, mask, kwargs.get("scaling"))
        return z if term is None else z + term

    def source(self, start, out):
        if start == 0:  # the input: from here on everything needs a gradient
            out = (out if self.input is None else self.input[:, :, None]).detach().requires_grad_(True)
        if self.subtract:
            self.delta[start:start + out.shape[2]] -= out.detach().permute(2, 0, 1, 3)
        return out

    def destination(self, start, x):
        prev, n, pos = int(self.graph.n_upstream[start]), x.shape[2], x.shape[1]

        def add_scores(grad):  # grad: (rows, pos, n, d_model) = dM/dx for slots start .. start + n - 1
            if self.scores.dim() == 3:  # per position: (prev, n, pos)
                self.scores[:prev, start:start + n, :pos] += torch.einsum(
                    "frtd,rtnd->fnt", self.delta[:prev], grad.to(self.delta.dtype)).float()
                return
            g = grad.permute(2, 0, 1, 3).reshape(n, -1)  # (n, rows * pos * d_model)
            self.scores[:prev, start:start + n] += (self.delta[:prev].reshape(prev, -1) @ g.T).float()  # (prev, n)

        x.register_hook(add_scores)
        return x


class Patch(Tap):
    """Edge patching: the edges marked in ``missing`` carry corrupted values. ``missing`` is a float weight
    per edge, (n_forward, n_backward), or per edge and position, (n_forward, n_backward, pos) for token
    circuits; 1 = patched (a weight between 0 and 1 interpolates, for derivatives)."""

    def __init__(self, graph: Graph, delta: torch.Tensor, missing: torch.Tensor):
        self.graph, self.delta = graph, delta
        self.missing = missing.to(delta.dtype)
        per_slot = self.missing != 0
        self.slot_patched = (per_slot.any(dim=2) if per_slot.dim() == 3 else per_slot).any(dim=0).tolist()

    def source(self, start, out):
        self.delta[start:start + out.shape[2]] -= out.permute(2, 0, 1, 3)
        return out

    def destination(self, start, x):
        n = x.shape[2]
        if not any(self.slot_patched[start:start + n]):
            return x
        prev = int(self.graph.n_upstream[start])
        _, rows, pos, d_model = self.delta.shape
        if self.missing.dim() == 3:  # per position: (prev, n, pos)
            weights = self.missing[:prev, start:start + n, :pos]
            return x + torch.einsum("fnt,frtd->rtnd", weights, self.delta[:prev])  # (rows, pos, n, d_model)
        weights = self.missing[:prev, start:start + n].T  # (n, prev)
        patch = (weights @ self.delta[:prev].reshape(prev, -1)).view(n, rows, pos, d_model)
        return x + patch.permute(1, 2, 0, 3)  # (rows, pos, n, d_model)


class _ReadRows(torch.autograd.Function):
    """Identity on the logits (batch, pos, vocab) whose backward unembeds only the positions with a nonzero
    gradient: a metric reads a few positions, and the rest would cost a (pos, vocab) x (vocab, d_model)
    matmul of zeros. Exact: a zero row of dM/dlogits gives a zero row of dM/dhidden."""

    @staticmethod
    def forward(ctx, hidden, logits, weight):  # hidden (..., d_model), logits (..., vocab), weight (vocab, d_model)
        ctx.save_for_backward(weight)
        ctx.hidden_shape = hidden.shape
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])  # (batch * pos, vocab)
        rows = flat.any(dim=1).nonzero().squeeze(1)  # positions the metric read (NaN counts as read)
        out = grad.new_zeros(flat.shape[0], weight.shape[1])  # (batch * pos, d_model)
        out.index_copy_(0, rows, flat.index_select(0, rows) @ weight)
        return out.view(ctx.hidden_shape), None, None


@contextmanager
def unembedding_backward_on_read_rows(model):
    """While active, the model's linear unembedding passes gradients through ``_ReadRows``."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        yield
        return

    def hook(module, args, logits):
        if not torch.is_grad_enabled() or not args[0].requires_grad:
            return logits
        return _ReadRows.apply(args[0], logits.detach(), module.weight)

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _straight_through_term(module, q, k, v, mask, scaling, scores=None) -> torch.Tensor | None:
    """A zero-valued (batch, pos, n_heads, d_head) term for a gated layer's output whose gradient is the
    straight-through one of its deterministic gates, or None for an ungated layer or gates forced by a scope.
    q, k, v: (batch, n_heads, pos, d_head), one k/v per query head (as wiring hands them over); ``scores``:
    the layer's q.k * scaling when the caller has them (the gradient then also reaches that tensor)."""
    from spartan_cli.gating.attention import STATE_ATTR, allowed_mask, gate_logits, soft_gates

    state = getattr(module, STATE_ATTR, None)
    if state is None or state.forced is not None:
        return None
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    if scores is None:
        with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 like the gates themselves
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (batch, n_heads, q, k)
    allowed = allowed_mask(mask, q.shape[2], k.shape[2], q.device)  # (batch|1, 1, q, k)
    pattern = torch.softmax(scores.detach().masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)  # P
    soft = soft_gates(state, gate_logits(state, scores))  # sigmoid(g), (batch, n_heads, q, k)
    surrogate = (pattern * (soft - soft.detach())).masked_fill(~allowed, 0.0)  # value 0, gradient P sigmoid'(g)
    return torch.matmul(surrogate.to(v.dtype), v.detach()).transpose(1, 2)  # (batch, pos, n_heads, d_head)


# what the backward passes through deterministic gates: name -> per-layer output term (None: nothing added)
GATE_GRADIENTS: dict[str, Callable | None] = {"hard": None, "straight-through": _straight_through_term}
DEFAULT_GATE_GRADIENT = "straight-through"  # measured on the addition checkpoint: CHANGELOG, Decisions


def evaluate_patched(model, batches: Iterable[Contrast], *, metric: Metric, graph: Graph, circuits: Sequence,
                     max_delta_mb: float, on_step: Callable[[EvaluationStep], None] | None,
                     prepare: Callable[..., tuple[Any, torch.Tensor, torch.Tensor]],
                     patch_for: Callable[[Any, Any], Tap]) -> Evaluation:
    """The evaluation loop of either level, per chunk of rows: ``prepare(wiring, batch, mask)`` runs the
    corrupted and clean forwards -> (state, corrupted logits, clean logits); then per circuit one clean run
    with ``patch_for(state, circuit)`` (a fresh tap: patching consumes its delta buffer). Means over the
    examples of m(circuit), m(full) and m(empty). No gradients; the model is wired for the call only."""
    from spartan_cli.hf.models import model_shape

    param = next(model.parameters())
    d_model = model_shape(model).d_model
    sums, clean_sum, corrupted_sum, examples = [0.0] * len(circuits), 0.0, 0.0, 0
    with torch.no_grad(), wired(model, graph) as wiring:
        for batch in chunks(batches, n_sources=graph.n_forward, d_model=d_model, max_delta_mb=max_delta_mb,
                            dtype=param.dtype):
            rows = batch.clean.shape[0]
            mask = None if batch.attention_mask is None else batch.attention_mask.to(param.device)
            state, corrupted_logits, clean_logits = prepare(wiring, batch, mask)
            corrupted_sum += float(metric(corrupted_logits, batch)) * rows
            clean_sum += float(metric(clean_logits, batch)) * rows
            clean_ids = batch.clean.to(param.device)
            for i, circuit in enumerate(circuits):
                sums[i] += float(metric(wiring.run(clean_ids, attention_mask=mask, tap=patch_for(state, circuit)),
                                        batch)) * rows
                if on_step is not None:
                    on_step(EvaluationStep(examples, i + 1, len(circuits)))
            examples += rows
    if examples == 0:
        raise ConfigError("evaluation got no examples; pass at least one non-empty batch")
    return Evaluation(tuple(s / examples for s in sums), clean_sum / examples, corrupted_sum / examples, examples)
