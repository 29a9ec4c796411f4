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

Gated models run with deterministic gates M = 1[g > 0]; ``gate_gradient`` picks what the backward passes
through them (``taps.GATE_GRADIENTS``); the forward values are the model's either way.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from spartan_cli.circuit.contrast import Contrast, Metric, chunks
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.taps import (DEFAULT_GATE_GRADIENT, DEFAULT_MAX_DELTA_MB, GATE_GRADIENTS, AttributionStep,
                                      Gradients, Record, unembedding_backward_on_read_rows)
from spartan_cli.circuit.wiring import wired
from spartan_cli.errors import ConfigError


def _gradient_scores(model, batches, *, metric, graph, ig_steps, max_delta_mb, on_step, method,
                     gate_gradient) -> Graph:
    from spartan_cli.hf.models import model_shape

    param = next(model.parameters())
    d_model = model_shape(model).d_model
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float32, device=param.device)
    examples = 0
    with wired(model, graph) as wiring, unembedding_backward_on_read_rows(model):
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
                    tap = Gradients(graph, delta, scores, subtract=True, gate_term=term)
                else:  # delta[0] = e_corr - e_clean, so this is e_corr + alpha (e_clean - e_corr)
                    tap = Gradients(graph, delta, scores, subtract=False, input=e_corr - alpha * delta[0],
                                     gate_term=term)
                with torch.enable_grad():
                    logits = wiring.run(batch.clean.to(param.device), attention_mask=mask, tap=tap)
                    (metric(logits, batch) * (rows / ig_steps)).backward()
            examples += rows
            if on_step is not None:
                on_step(AttributionStep(method, examples))
    if examples == 0:
        raise ConfigError("attribution got no examples; pass at least one non-empty batch")
    from spartan_cli.gating.attention import is_gated

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
