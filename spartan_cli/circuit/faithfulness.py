"""Edge-patching evaluation of component circuits and the faithfulness-vs-edges curve.

Evaluating a circuit C (docs/circuits.md, "Choosing and checking a circuit", EAP-IG ``evaluate_graph``), per chunk of rows:
1. Corrupted forward (``taps.Record``): delta[u] = a_u^corr for every source u. Its metric, scored with
   the clean batch's answers, is m(empty).
2. Clean forward without intervention: m(full).
3. For each circuit, a clean forward with ``taps.Patch``: edges outside C carry corrupted values.
4. Metrics are averaged over examples; then F(C) = (m(C) - m(empty)) / (m(full) - m(empty)).
The corrupted activations of a chunk are computed once and shared by every circuit of a sweep.
``exact_scores``: one such evaluation per edge, of the full circuit minus that edge.
Curves, their reading and minimizing are shared with token circuits: ``curve``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from spartan_cli.circuit.contrast import Contrast, Metric
from spartan_cli.circuit.curve import Curve, Evaluation, EvaluationStep, sweep_curve
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.select import select
from spartan_cli.circuit.taps import DEFAULT_MAX_DELTA_MB, Patch, Record, evaluate_patched


def evaluate(model, batches: Iterable[Contrast], *, metric: Metric, circuits: Sequence[Graph | torch.Tensor],
             graph: Graph | None = None, max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
             on_step: Callable[[EvaluationStep], None] | None = None) -> Evaluation:
    """Mean metric of every circuit under edge patching, with m(full) and m(empty).

    A circuit is a Graph or an ``in_graph`` (n_forward, n_backward) bool tensor of ``graph`` (default: the
    first circuit's graph, else the model's). Circuits are read one at a time, so a lazy sequence keeps
    memory flat. No gradients; the model is wired for the call only."""
    from spartan_cli.hf.models import model_shape

    if graph is None:
        graph = circuits[0] if circuits and isinstance(circuits[0], Graph) else Graph.from_model(model)
    param = next(model.parameters())
    d_model = model_shape(model).d_model
    real = graph.real.to(param.device)

    def prepare(wiring, batch, mask):
        rows, pos = batch.clean.shape
        corrupted = torch.empty(graph.n_forward, rows, pos, d_model, dtype=param.dtype, device=param.device)
        corrupted_logits = wiring.run(batch.corrupted.to(param.device), attention_mask=mask, tap=Record(corrupted))
        return corrupted, corrupted_logits, wiring.run(batch.clean.to(param.device), attention_mask=mask)

    def patch_for(corrupted, circuit):
        in_graph = circuit.in_graph if isinstance(circuit, Graph) else circuit
        return Patch(graph, corrupted.clone(), real & ~in_graph.to(param.device, torch.bool))

    return evaluate_patched(model, batches, metric=metric, graph=graph, circuits=circuits, max_delta_mb=max_delta_mb,
                            on_step=on_step, prepare=prepare, patch_for=patch_for)


class _AllButOne(Sequence):
    """The full circuit minus edge i, for each real edge i, built on demand."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.edges = torch.nonzero(graph.real)  # (n_edges, 2)

    def __len__(self) -> int:
        return len(self.edges)

    def __getitem__(self, i):
        circuit = self.graph.real.clone()
        f, b = self.edges[i].tolist()
        circuit[f, b] = False
        return circuit


def exact_scores(model, batches: Iterable[Contrast], *, metric: Metric, graph: Graph | None = None,
                 max_delta_mb: float = DEFAULT_MAX_DELTA_MB) -> Graph:
    """Ground truth for attribution: s(u -> v) = m(every edge but u -> v) - m(full), one patched run per edge.

    Costs one clean forward per edge and chunk: use it on small models only."""
    graph = Graph.from_model(model) if graph is None else graph
    circuits = _AllButOne(graph)
    result = evaluate(model, batches, metric=metric, circuits=circuits, graph=graph, max_delta_mb=max_delta_mb)
    scores = torch.zeros(graph.n_forward, graph.n_backward)
    scores[circuits.edges[:, 0], circuits.edges[:, 1]] = torch.tensor(result.metrics) - result.clean
    return graph.with_scores(scores, method="exact", n_examples=result.n_examples)


# -- curves -------------------------------------------------------------------------------------------------


def sweep(model, batches: Iterable[Contrast], *, metric: Metric, graph: Graph, sizes: Sequence[int] | None = None,
          selection: str = "greedy", absolute: bool = True, max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
          on_step: Callable[[EvaluationStep], None] | None = None) -> Curve:
    """Faithfulness of the circuits selected from ``graph``'s scores (from ``attribute``) at each requested
    size (default: ``log_grid``). Circuits that prune to the same edges are evaluated once."""
    return sweep_curve(graph, sizes, selection, select_at=lambda n: select(graph, n, how=selection, absolute=absolute),
                       evaluate_with=lambda circuits: evaluate(model, batches, metric=metric, circuits=circuits,
                                                               graph=graph, max_delta_mb=max_delta_mb,
                                                               on_step=on_step))
