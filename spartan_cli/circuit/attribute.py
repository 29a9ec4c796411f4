"""Edge attribution: EAP (Syed, Rager & Conmy 2023, arXiv 2310.10348) and EAP-IG (Hanna, Pezzelle & Belinkov
2024, arXiv 2403.17806), on the wired model (docs/circuits.md, "Scores").

For an edge u -> v the score estimates M(edge patched to corrupted) - M(clean):
    s(u->v) = mean over examples of sum over positions of (a_u^corr - a_u^clean) . dM/dx_v
Per chunk of rows (sized so the delta buffer (n_sources, rows, pos, d_model) fits ``max_delta_mb``):
1. Corrupted forward, no grad: delta[u] = a_u^corr for every source u.
2. Clean forward with grad: delta[u] -= a_u^clean; backward of rows * M; at each destination slot v the
   gradient g_v (rows, pos, d_model) adds delta[:prev(v)] . g_v (over rows, pos, d_model) to scores[:prev(v), v].
   This is EAP: one corrupted forward, one clean forward and one backward.
3. EAP-IG-inputs with m steps: the gradient is averaged over inputs e_corr + (k/m)(e_clean - e_corr),
   k = m, m-1, ..., 1 (the right Riemann sum of the paper's code, ``attribute_mem.py``, so m = 1 is EAP;
   the current EAP-IG library uses k = 0..m-1). Step k = m is the clean run of step 2.
4. Scores are divided by the number of examples (and by m). The sign is kept (corrupted - clean);
   selection ranks |s|.
``exact`` patches one edge at a time (one clean forward per edge and chunk): ground truth for small models.

Gated models run with deterministic gates M = 1[g > 0], whose derivative is zero: the hard gradient cannot
see that corrupting a head's q or k input opens or shuts its gates. ``gate_gradient`` picks what the
backward passes through the gates (``GATE_GRADIENTS``); the forward values are the model's either way:
- ``hard``: the exact derivative of the deterministic forward (zero through M).
- ``straight-through``: as training does, dM/dg = sigmoid'(g) (here at g itself, without noise): each
  gated layer's output gets a term sum_j P_ij (s_ij - s_ij.detach()) v_j, s = sigmoid(g), which is exactly
  zero but carries P * sigmoid'(g) into q and k.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from spartan_cli.circuit.contrast import Contrast, Metric, chunks
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


class _Gradients(Tap):
    """A run with gradients: optionally subtracts this run's sources from ``delta``, optionally replaces the
    input, and at every destination adds delta . gradient to ``scores`` during the backward pass."""

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
        prev, n = int(self.graph.n_upstream[start]), x.shape[2]

        def add_scores(grad):  # grad: (rows, pos, n, d_model) = dM/dx for slots start .. start + n - 1
            g = grad.permute(2, 0, 1, 3).reshape(n, -1)  # (n, rows * pos * d_model)
            self.scores[:prev, start:start + n] += (self.delta[:prev].reshape(prev, -1) @ g.T).float()  # (prev, n)

        x.register_hook(add_scores)
        return x


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
def _unembedding_backward_on_read_rows(model):
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
    from spartan_cli.attention import STATE_ATTR, allowed_mask
    from spartan_cli.gates import gate_kind

    state = getattr(module, STATE_ATTR, None)
    if state is None or state.forced is not None:
        return None
    kind = gate_kind(state.cfg.kind)
    scaling = q.shape[-1] ** -0.5 if scaling is None else scaling
    if scores is None:
        with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 like the gates themselves
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling  # (batch, n_heads, q, k)
    allowed = allowed_mask(mask, q.shape[2], k.shape[2], q.device)  # (batch|1, 1, q, k)
    pattern = torch.softmax(scores.detach().masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)  # P
    soft = kind.open_probability(kind.logits(scores, state.cfg.bias))  # sigmoid(g), (batch, n_heads, q, k)
    surrogate = (pattern * (soft - soft.detach())).masked_fill(~allowed, 0.0)  # value 0, gradient P sigmoid'(g)
    return torch.matmul(surrogate.to(v.dtype), v.detach()).transpose(1, 2)  # (batch, pos, n_heads, d_head)


# what the backward passes through deterministic gates: name -> per-layer output term (None: nothing added)
GATE_GRADIENTS: dict[str, Callable | None] = {"hard": None, "straight-through": _straight_through_term}
DEFAULT_GATE_GRADIENT = "straight-through"  # measured on the addition checkpoint: CHANGELOG, Decisions


def _gradient_scores(model, batches, *, metric, graph, ig_steps, max_delta_mb, on_step, method,
                     gate_gradient) -> Graph:
    from spartan_cli.models import model_shape

    param = next(model.parameters())
    d_model = model_shape(model).d_model
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float32, device=param.device)
    examples = 0
    with wired(model, graph) as wiring, _unembedding_backward_on_read_rows(model):
        for batch in chunks(batches, n_sources=graph.n_forward, d_model=d_model, max_delta_mb=max_delta_mb,
                            dtype=param.dtype):
            rows, pos = batch.clean.shape
            mask = None if batch.attention_mask is None else batch.attention_mask.to(param.device)
            delta = torch.empty(graph.n_forward, rows, pos, d_model, dtype=param.dtype, device=param.device)
            with torch.no_grad():  # sources only: the corrupted logits go unread
                wiring.record(batch.corrupted.to(param.device), attention_mask=mask, tap=Record(delta))
            e_corr = delta[0].clone()  # (rows, pos, d_model)
            for k in range(ig_steps, 0, -1):
                alpha = k / ig_steps
                term = GATE_GRADIENTS[gate_gradient]
                if k == ig_steps:  # the clean run: completes delta = a^corr - a^clean
                    tap = _Gradients(graph, delta, scores, subtract=True, gate_term=term)
                else:  # delta[0] = e_corr - e_clean, so this is e_corr + alpha (e_clean - e_corr)
                    tap = _Gradients(graph, delta, scores, subtract=False, input=e_corr - alpha * delta[0],
                                     gate_term=term)
                with torch.enable_grad():
                    logits = wiring.run(batch.clean.to(param.device), attention_mask=mask, tap=tap)
                    (metric(logits, batch) * (rows / ig_steps)).backward()
            examples += rows
            if on_step is not None:
                on_step(AttributionStep(method, examples))
    if examples == 0:
        raise ConfigError("attribution got no examples; pass at least one non-empty batch")
    from spartan_cli.evaluate import is_gated

    gated = is_gated(model)
    return graph.with_scores(scores.cpu() / examples, method=method, ig_steps=ig_steps, n_examples=examples,
                             gate_gradient=gate_gradient if gated else None)


def _eap(model, batches, *, metric, graph, ig_steps, max_delta_mb, on_step, gate_gradient):
    return _gradient_scores(model, batches, metric=metric, graph=graph, ig_steps=1, max_delta_mb=max_delta_mb,
                            on_step=on_step, method="eap", gate_gradient=gate_gradient)


def _eap_ig(model, batches, *, metric, graph, ig_steps, max_delta_mb, on_step, gate_gradient):
    return _gradient_scores(model, batches, metric=metric, graph=graph, ig_steps=ig_steps,
                            max_delta_mb=max_delta_mb, on_step=on_step, method="eap-ig-inputs",
                            gate_gradient=gate_gradient)


def _exact(model, batches, *, metric, graph, ig_steps, max_delta_mb, on_step, gate_gradient):
    from spartan_cli.circuit.faithfulness import exact_scores

    return exact_scores(model, batches, metric=metric, graph=graph, max_delta_mb=max_delta_mb)


METHODS: dict[str, Callable] = {"eap": _eap, "eap-ig-inputs": _eap_ig, "exact": _exact}


def attribute(model, batches: Iterable[Contrast], *, metric: Metric, method: str = "eap-ig-inputs",
              ig_steps: int = 5, graph: Graph | None = None, max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
              on_step: Callable[[AttributionStep], None] | None = None,
              gate_gradient: str = DEFAULT_GATE_GRADIENT) -> Graph:
    """Score every edge of ``graph`` (default: the model's full graph) -> the graph with ``scores`` set.

    ``batches``: ContrastBatch-like (clean, corrupted, attention_mask; right-padded). ``metric(logits, batch)``
    returns the batch mean. ``method``: one of ``METHODS``; ``ig_steps`` is used by ``eap-ig-inputs`` only.
    ``gate_gradient``: one of ``GATE_GRADIENTS``, the backward through a gated model's deterministic gates
    (gradient methods only; ungated models and ``exact`` ignore it).
    The circuit (``in_graph``) of the returned graph is unchanged; select one with ``select``.
    """
    if method not in METHODS:
        raise ConfigError(f"attribution method {method!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    if gate_gradient not in GATE_GRADIENTS:
        raise ConfigError(f"gate gradient {gate_gradient!r} is unknown; choose one of "
                          f"{', '.join(sorted(GATE_GRADIENTS))}")
    if ig_steps < 1:
        raise ConfigError(f"ig_steps must be >= 1, got {ig_steps!r}")
    if max_delta_mb <= 0:
        raise ConfigError(f"max_delta_mb must be > 0, got {max_delta_mb!r}")
    graph = Graph.from_model(model) if graph is None else graph
    return METHODS[method](model, batches, metric=metric, graph=graph, ig_steps=ig_steps,
                           max_delta_mb=max_delta_mb, on_step=on_step, gate_gradient=gate_gradient)
