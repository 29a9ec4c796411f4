"""Token-level attribution and edge patching (docs/circuits.md, "Token-level graphs"): residual edges per position, attention edges
per (query, key) pair, on the wired model.

Attention with per-pair overrides (``mixed_attention``), per head, for query i and key j <= i:
1. s_ij = q_i . k~_ij * scaling, with k~_ij = w^k_ij k_j + (1 - w^k_ij) k_j^corr (w = 1: this run's key,
   w = 0: the corrupted run's); in fp32 (fp64 for float64 models).
2. P = softmax over the allowed keys. A gated model's gates are recomputed from s: M = 1[s + b > 0] (a
   corrupted key may open or shut a gate: faithful to the model), no gradient through the threshold;
   A = P * M (no renormalisation). A dense model has A = P.
3. y_i = sum_j A_ij (w^v_ij v_j + (1 - w^v_ij) v_j^corr).
With every w = 1 this is the model's own attention (the full circuit reproduces the clean run).

Which pairs are edges: on the clean run of each prompt, the pairs whose deterministic gate is open (gated)
or every causal pair of a real query (dense). A pair that is no edge in a prompt always reads this run's
key and value (w = 1): its gate is shut on the clean run, so its value does not pass while the gate stays
shut; its key still enters the softmax normaliser (masking is after the softmax).

Scores (``attribute_tokens``), the first-order estimate of m(edge patched to corrupted) - m(clean), summed
over prompts, then divided by their number (per (edge, position) means over examples):
- residual (u, t) -> (v, t): (a_u^corr[t] - a_u^clean[t]) . dM/dx_v[t]  (EAP, kept per position);
- value (l, h, j -> i): dM/dy_i . A_ij (v_j^corr - v_j^clean)  (exact in v: y_i is linear in v_j);
- key (l, h, j -> i): dM/ds_ij . q_i . (k_j^corr - k_j^clean) * scaling  (through the softmax; zero for
  pairs that are no edge).
EAP-IG-inputs (``ig_steps`` > 1) averages the gradients over inputs interpolated from the corrupted to the
clean embedding; the differences come from the real clean and corrupted runs, as in ``attribute``.

Patching (``evaluate_tokens``) per chunk of rows: one corrupted run records every source output and every
layer's k and v; one clean run gives m(full) and the edges of each prompt; then per circuit one clean run in
which each destination at position t reads x_v[t] + sum over parents u with (u, t) -> (v, t) missing of
delta_u[t] (delta = corrupted - this run, final before any reader as in ``faithfulness``), and each head
mixes keys and values with w = 0 on the missing attention edges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from spartan_cli.circuit.contrast import Contrast, Metric, chunks
from spartan_cli.circuit.curve import Curve, Evaluation, EvaluationStep, sweep_curve
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.taps import (DEFAULT_GATE_GRADIENT, DEFAULT_MAX_DELTA_MB, GATE_GRADIENTS, AttributionStep,
                                      Gradients, Patch, Record, evaluate_patched)
from spartan_cli.circuit.tokens import TokenGraph, selection_order, select_tokens
from spartan_cli.circuit.wiring import Tap, wired
from spartan_cli.errors import ConfigError

GATE_POLICY = ("recompute: in patched runs each gate is recomputed from the mixed key, 1[q.k~ * scaling + b > 0], "
               "so a corrupted key may open a gate that is shut on the clean run; a pair whose gate is shut on the "
               "clean run is no edge and reads this run's key and value")


# ----------------------------------------------------------------------------------------- attention
@dataclass
class Attended:
    """One mixed attention call: the output and what scoring reads."""

    z: torch.Tensor  # (batch, pos, n_heads, d_head), the model's dtype
    y: torch.Tensor  # (batch, n_heads, pos, d_head) fp32 (fp64), before the transpose
    s: torch.Tensor  # (batch, n_heads, pos_q, pos_k) fp32 (fp64) scores
    a: torch.Tensor  # (batch, n_heads, pos_q, pos_k) fp32 (fp64) attention weights A (after gates)
    edges: torch.Tensor  # (batch, n_heads, pos_q, pos_k) bool: open gates (gated) or allowed pairs (dense)


def _gate_state(module, attention):
    """The GateState of a gated module whose attention is spartan's, else None (dense)."""
    from spartan_cli.gating.attention import STATE_ATTR, gated_attention_forward

    return getattr(module, STATE_ATTR) if attention is gated_attention_forward else None


def mixed_attention(module, attention, q, k, v, mask, *, scaling, k_alt=None, v_alt=None, keep_k=None,
                    keep_v=None) -> Attended:
    """Steps 1-3 of the module docstring. q, k, v, k_alt, v_alt: (batch, n_heads, pos, d_head);
    keep_k/keep_v: (batch, n_heads, pos_q, pos_k) float weights of this run's k/v (None: all 1)."""
    from spartan_cli.gating.attention import allowed_mask

    B, H, T, _ = q.shape
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 for float64 models)
    qf = q.to(dt)
    s = torch.matmul(qf, k.to(dt).transpose(-1, -2)) * scaling  # (batch, n_heads, pos_q, pos_k)
    if keep_k is not None:
        s_alt = torch.matmul(qf, k_alt.to(dt).transpose(-1, -2)) * scaling
        s = s_alt + keep_k.to(dt) * (s - s_alt)
    allowed = allowed_mask(mask, T, T, q.device)  # (batch|1, 1, pos_q, pos_k) bool
    p = torch.softmax(s.masked_fill(~allowed, torch.finfo(s.dtype).min), dim=-1)
    state = _gate_state(module, attention)
    if state is None:
        a, edges = p, allowed.expand(B, H, T, T)
    else:
        from spartan_cli.gating.attention import gate_logits, gates

        edges = gates(state, gate_logits(state, s.detach()), allowed).bool().expand(B, H, T, T)  # 1[g > 0] or forced
        a = p * edges
    vf = v.to(dt)
    if keep_v is None:
        y = torch.matmul(a, vf)  # (batch, n_heads, pos, d_head)
    else:
        keep_v = keep_v.to(dt)
        y = torch.matmul(a * keep_v, vf) + torch.matmul(a * (1 - keep_v), v_alt.to(dt))
    return Attended(y.transpose(1, 2).to(v.dtype), y, s, a, edges)


def _query_real(mask, B, T, device) -> torch.Tensor:
    """(batch, 1, pos_q, 1) bool: real (unpadded) query positions."""
    if mask is None or mask.dim() != 2:
        return torch.ones(B, 1, T, 1, dtype=torch.bool, device=device)
    return mask.bool()[:, None, :, None]


# ------------------------------------------------------------------------------------------- taps
class RecordTokens(Record):
    """The corrupted run: every source output into ``delta``, every layer's k and v into ``kv``."""

    def __init__(self, delta: torch.Tensor, kv: dict):
        super().__init__(delta)
        self.kv = kv

    def attend(self, layer, attention, module, q, k, v, mask, **kwargs):
        self.kv[layer] = (k.detach(), v.detach())
        return super().attend(layer, attention, module, q, k, v, mask, **kwargs)


class CleanEdges(Tap):
    """The clean run: which (query, key) pairs are edges in each prompt, per layer (batch, n_heads, q, k)."""

    def __init__(self, attn_mask):
        self.attn_mask = attn_mask
        self.edges: dict[int, torch.Tensor] = {}

    def attend(self, layer, attention, module, q, k, v, mask, *, scaling, **kwargs):
        out = mixed_attention(module, attention, q, k, v, mask, scaling=scaling)
        B, H, T, _ = q.shape
        self.edges[layer] = out.edges & _query_real(self.attn_mask, B, T, q.device)
        return attention(module, q, k, v, mask, scaling=scaling, **kwargs)[0]


class TokenScores(Gradients):
    """A gradient run: residual scores per position at every destination (``Gradients`` with a position
    axis), key and value scores per (query, key) pair from each layer's mixed attention.

    ``clean_kv``: the clean run's k and v per layer; filled on the first (clean) step and reused by the
    interpolated ones, so every step multiplies its gradients by the same real differences."""

    def __init__(self, graph: Graph, delta, res_scores, attn_scores, corr_kv, clean_kv, edges, *, subtract: bool,
                 input: torch.Tensor | None = None, gate_term: Callable | None = None):
        super().__init__(graph, delta, res_scores, subtract=subtract, input=input, gate_term=gate_term)
        self.attn, self.corr_kv, self.clean_kv, self.edges = attn_scores, corr_kv, clean_kv, edges

    def attend(self, layer, attention, module, q, k, v, mask, *, scaling, **kwargs):
        if layer not in self.clean_kv:
            self.clean_kv[layer] = (k.detach(), v.detach())
        k_clean, v_clean = self.clean_kv[layer]
        k_corr, v_corr = self.corr_kv[layer]
        out = mixed_attention(module, attention, q, k, v, mask, scaling=scaling)
        dt = out.a.dtype
        edges = self.edges[layer].to(dt)  # (batch, n_heads, q, k)
        dk = k_corr.to(dt) - k_clean.to(dt)  # (batch, n_heads, pos, d_head)
        dv = v_corr.to(dt) - v_clean.to(dt)
        a, qf = out.a.detach(), q.detach().to(dt)
        T = q.shape[2]
        scores = self.attn  # (n_layers, n_heads, 2, pos_q, pos_k)

        def on_y(grad):  # dM/dy (batch, n_heads, pos, d_head)
            value = torch.matmul(grad.to(dt), dv.transpose(-1, -2))  # (batch, n_heads, q, k): g_i . dv_j
            scores[layer, :, 1, :T, :T] += (edges * a * value).sum(0)

        def on_s(grad):  # dM/ds (batch, n_heads, q, k)
            key = torch.matmul(qf, dk.transpose(-1, -2)) * scaling  # q_i . dk_j * scaling
            scores[layer, :, 0, :T, :T] += (edges * grad.to(dt) * key).sum(0)

        if out.y.requires_grad:
            out.y.register_hook(on_y)
            out.s.register_hook(on_s)
        term = None if self.gate_term is None else self.gate_term(module, q, k, v, mask, scaling, scores=out.s)
        return out.z if term is None else out.z + term.to(out.z.dtype)  # term: value 0, gradient into s


class TokenPatch(Patch):
    """Edge patching of one token circuit: ``missing`` (n_forward, n_backward, pos) float residual weights
    (``Patch`` with a position axis), ``kept`` (n_layers, n_heads, 2, pos_q, pos_k) float attention weights
    per prompt-independent pair; a pair that is no edge in a prompt keeps this run's k/v."""

    def __init__(self, graph: Graph, delta, missing, kept, corr_kv, edges):
        super().__init__(graph, delta, missing)
        self.kept, self.corr_kv, self.edges = kept, corr_kv, edges
        self.layer_patched = (kept != 1).flatten(1).any(dim=1).tolist()

    def attend(self, layer, attention, module, q, k, v, mask, *, scaling, **kwargs):
        if not self.layer_patched[layer]:
            return attention(module, q, k, v, mask, scaling=scaling, **kwargs)[0]
        T = q.shape[2]
        edges = self.edges[layer].to(self.kept.dtype)  # (batch, n_heads, q, k)
        kept = self.kept[layer, :, :, :T, :T]  # (n_heads, 2, q, k)
        keep_k = 1 - edges * (1 - kept[:, 0])  # (batch, n_heads, q, k): no edge -> 1
        keep_v = 1 - edges * (1 - kept[:, 1])
        k_corr, v_corr = self.corr_kv[layer]
        return mixed_attention(module, attention, q, k, v, mask, scaling=scaling, k_alt=k_corr, v_alt=v_corr,
                               keep_k=keep_k, keep_v=keep_v).z


# ------------------------------------------------------------------------------------------- verbs
def _layout(batches: Sequence[Contrast]) -> tuple[int, tuple[int, ...]]:
    """(positions, metric positions): the longest prompt, and each row's last real position."""
    n_pos, metric = 0, set()
    for batch in batches:
        rows, pos = batch.clean.shape
        n_pos = max(n_pos, pos)
        if batch.attention_mask is None:
            metric.add(pos - 1)
        else:
            metric.update((batch.attention_mask.long().sum(1) - 1).tolist())
    if n_pos == 0:
        raise ConfigError("token-level circuits got no examples; pass at least one non-empty batch")
    return n_pos, tuple(sorted(metric))


def _corrupted_and_clean(wiring, batch, graph: Graph, param, d_model):
    """(delta, corrupted k/v per layer, clean edges per layer, mask) of one chunk; delta = corrupted sources."""
    rows, pos = batch.clean.shape
    mask = None if batch.attention_mask is None else batch.attention_mask.to(param.device)
    delta = torch.empty(graph.n_forward, rows, pos, d_model, dtype=param.dtype, device=param.device)
    corr_kv: dict = {}
    with torch.no_grad():
        corrupted_logits = wiring.run(batch.corrupted.to(param.device), attention_mask=mask,
                                      tap=RecordTokens(delta, corr_kv))
        clean = CleanEdges(mask)
        clean_logits = wiring.run(batch.clean.to(param.device), attention_mask=mask, tap=clean)
    return delta, corr_kv, clean.edges, mask, corrupted_logits, clean_logits


def attribute_tokens(model, batches: Iterable[Contrast], *, metric: Metric, ig_steps: int = 1,
                     graph: Graph | None = None, max_delta_mb: float = DEFAULT_MAX_DELTA_MB, meta: dict | None = None,
                     on_step: Callable[[AttributionStep], None] | None = None,
                     gate_gradient: str = DEFAULT_GATE_GRADIENT) -> TokenGraph:
    """Score every token edge (module docstring) -> a TokenGraph with every edge in the circuit.

    ``batches`` must share one layout (position p means the same in every prompt); ``metric`` reads each
    row's last real position (the logits nodes). Gated models: deterministic gates, and the attention edges
    are the pairs open on the clean run of some prompt (``open_share``: the share of prompts); the backward
    passes the gates as ``gate_gradient`` says (attribute.GATE_GRADIENTS: hard zero, or straight-through
    sigmoid'(g), which then also enters the key scores of open pairs: a corrupted key may shut a gate)."""
    from spartan_cli.gating.attention import is_gated
    from spartan_cli.hf.models import model_shape

    if ig_steps < 1:
        raise ConfigError(f"ig_steps must be >= 1, got {ig_steps!r}")
    if gate_gradient not in GATE_GRADIENTS:
        raise ConfigError(f"gate gradient {gate_gradient!r} is unknown; choose one of "
                          f"{', '.join(sorted(GATE_GRADIENTS))}")
    batches = list(batches)
    n_pos, metric_positions = _layout(batches)
    graph = Graph.from_model(model) if graph is None else graph
    param = next(model.parameters())
    d_model, L, H = model_shape(model).d_model, graph.n_layers, graph.n_heads
    res = torch.zeros(graph.n_forward, graph.n_backward, n_pos, device=param.device)
    attn = torch.zeros(L, H, 2, n_pos, n_pos, device=param.device)
    opened = torch.zeros(L, H, n_pos, n_pos, device=param.device)
    examples = 0
    with wired(model, graph) as wiring:
        for batch in chunks(batches, n_sources=graph.n_forward, d_model=d_model, max_delta_mb=max_delta_mb,
                            dtype=param.dtype):
            rows, pos = batch.clean.shape
            delta, corr_kv, edges, mask, _, _ = _corrupted_and_clean(wiring, batch, graph, param, d_model)
            for layer, e in edges.items():
                opened[layer, :, :pos, :pos] += e.sum(0)
            e_corr = delta[0].clone()  # (rows, pos, d_model)
            clean_kv: dict = {}
            for k in range(ig_steps, 0, -1):
                alpha = k / ig_steps
                tap = TokenScores(graph, delta, res, attn, corr_kv, clean_kv, edges, subtract=k == ig_steps,
                                  input=None if k == ig_steps else e_corr - alpha * delta[0],
                                  gate_term=GATE_GRADIENTS[gate_gradient])
                with torch.enable_grad():
                    logits = wiring.run(batch.clean.to(param.device), attention_mask=mask, tap=tap)
                    (metric(logits, batch) * (rows / ig_steps)).backward()
            examples += rows
            if on_step is not None:
                on_step(AttributionStep("token", examples))
    if examples == 0:
        raise ConfigError("attribution got no examples; pass at least one non-empty batch")
    gated = is_gated(model)
    pairs = opened.cpu() > 0  # (n_layers, n_heads, q, k)
    tokens = TokenGraph.build(graph, n_pos=n_pos, metric_positions=metric_positions, attn_pairs=pairs, gated=gated,
                              open_share=(opened.cpu() / examples) if gated else None,
                              meta={**(meta or {}), "n_examples": examples,
                                    "gate_policy": GATE_POLICY if gated else None,
                                    "gate_gradient": gate_gradient if gated else None})
    res, attn = res.cpu() / examples, attn.cpu() / examples
    flat = torch.cat([res[tokens.residual_real], attn[tuple(tokens.attn_index.unbind(1))]])
    return tokens.with_scores(flat, method="eap-ig-inputs" if ig_steps > 1 else "eap", ig_steps=ig_steps)


def evaluate_tokens(model, batches: Iterable[Contrast], *, metric: Metric, graph: TokenGraph,
                    circuits: Sequence[torch.Tensor | TokenGraph], max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
                    on_step: Callable[[EvaluationStep], None] | None = None) -> Evaluation:
    """Mean metric of every token circuit (an ``in_graph`` (n_edges,) bool or a TokenGraph) under patching,
    with m(full) and m(empty). No gradients."""
    from spartan_cli.hf.models import model_shape

    param = next(model.parameters())
    d_model = model_shape(model).d_model
    component = graph.component

    def prepare(wiring, batch, mask):
        if batch.clean.shape[1] > graph.n_pos:
            raise ConfigError(f"prompts of {batch.clean.shape[1]} positions do not fit a token graph of {graph.n_pos}")
        corrupted, corr_kv, edges, _, corrupted_logits, clean_logits = _corrupted_and_clean(
            wiring, batch, component, param, d_model)
        return (corrupted, corr_kv, edges), corrupted_logits, clean_logits

    def patch_for(state, circuit):
        corrupted, corr_kv, edges = state
        in_graph = circuit.in_graph if isinstance(circuit, TokenGraph) else circuit
        missing, kept = graph.masks(in_graph, device=param.device)
        return TokenPatch(component, corrupted.clone(), missing, kept.to(torch.float32), corr_kv, edges)

    return evaluate_patched(model, batches, metric=metric, graph=component, circuits=circuits,
                            max_delta_mb=max_delta_mb, on_step=on_step, prepare=prepare, patch_for=patch_for)


def sweep_tokens(model, batches: Iterable[Contrast], *, metric: Metric, graph: TokenGraph,
                 sizes: Sequence[int] | None = None, selection: str = "greedy",
                 max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
                 on_step: Callable[[EvaluationStep], None] | None = None) -> Curve:
    """Faithfulness of the token circuits selected from ``graph``'s scores at each requested size (default:
    ``log_grid``); circuits that prune to the same edges are evaluated once."""
    order = selection_order(graph, selection)
    return sweep_curve(graph, sizes, selection, select_at=lambda n: select_tokens(graph, n, order=order),
                       evaluate_with=lambda circuits: evaluate_tokens(model, batches, metric=metric, graph=graph,
                                                                      circuits=circuits, max_delta_mb=max_delta_mb,
                                                                      on_step=on_step))


__all__ = ["GATE_POLICY", "Attended", "TokenPatch", "TokenScores", "attribute_tokens", "evaluate_tokens",
           "mixed_attention", "sweep_tokens"]
