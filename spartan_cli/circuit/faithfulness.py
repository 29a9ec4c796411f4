"""Edge-patching evaluation of circuits, normalized faithfulness, and the faithfulness-vs-edges curve.

Evaluating a circuit C (CIRCUITS.md §3.5, EAP-IG ``evaluate_graph``), per chunk of rows:
1. Corrupted forward: delta[:, :, u] = a_u^corr for every source u. Its metric, scored with the clean
   batch's answers, is m(empty).
2. Clean forward without intervention: m(full).
3. For each circuit, a clean forward in which every source subtracts its current output,
   delta[:, :, u] -= a_u, and every destination v reads x_v + sum over parents u with (u -> v) not in C of
   delta[:, :, u]. Sources fire in forward order, so delta[u] is final before any reader uses it: edges
   outside C carry corrupted values, edges inside carry the values of this intervened run.
4. Metrics are averaged over examples; then F(C) = (m(C) - m(empty)) / (m(full) - m(empty)).
The corrupted activations of a chunk are computed once and shared by every circuit of a sweep.

Curves (CIRCUITS.md §4): circuits of increasing requested size (greedy or top-n, then pruned); the
edges needed for a faithfulness level are read off the running maximum of F (curves are not monotone);
CPR and CMD are trapezoid areas of F and |1 - F| over the requested edge fraction, as in MIB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from spartan_cli.circuit.attribute import DEFAULT_MAX_DELTA_MB, Record
from spartan_cli.circuit.contrast import Contrast, Metric, chunks
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.select import select
from spartan_cli.circuit.wiring import Tap, wired
from spartan_cli.errors import ConfigError

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Patch(Tap):
    """Edge patching: edges marked in ``missing`` (n_forward, n_backward) carry corrupted values."""

    def __init__(self, graph: Graph, delta: torch.Tensor, missing: torch.Tensor):
        self.graph, self.delta = graph, delta
        self.missing = missing.to(delta.dtype)  # (n_forward, n_backward): 1 where the edge is patched
        self.slot_patched = missing.any(dim=0).tolist()

    def source(self, start, out):
        self.delta[:, :, start:start + out.shape[2]] -= out
        return out

    def destination(self, start, x):
        n = x.shape[2]
        if not any(self.slot_patched[start:start + n]):
            return x
        prev = int(self.graph.n_upstream[start])
        patch = torch.einsum("btfd,fs->btsd", self.delta[:, :, :prev], self.missing[:prev, start:start + n])
        return x + patch  # (rows, pos, n, d_model)


@dataclass(frozen=True)
class Evaluation:
    """Mean metrics over the examples: one per circuit, and the two baselines."""

    metrics: tuple[float, ...]
    clean: float  # m(full): the clean run, no intervention
    corrupted: float  # m(empty): the corrupted run, scored with the clean answers
    n_examples: int

    def faithfulness(self, metric: float) -> float:
        return faithfulness(metric, clean=self.clean, corrupted=self.corrupted)


def faithfulness(metric: float, *, clean: float, corrupted: float) -> float:
    """Normalized faithfulness (m(C) - m(empty)) / (m(full) - m(empty)); NaN when the baselines coincide."""
    span = clean - corrupted
    return (metric - corrupted) / span if span != 0 else math.nan


def evaluate(model, graph: Graph, circuits: Sequence[torch.Tensor], batches: Iterable[Contrast], metric: Metric,
             *, max_delta_mb: float = DEFAULT_MAX_DELTA_MB) -> Evaluation:
    """Mean metric of every circuit (an ``in_graph`` (n_forward, n_backward) bool tensor, or a Graph)
    under edge patching, with m(full) and m(empty). No gradients; the model is wired for the call only."""
    from spartan_cli.models import model_shape

    param = next(model.parameters())
    d_model = model_shape(model).d_model
    missing = [graph.real & ~(c.in_graph if isinstance(c, Graph) else c.to(torch.bool)) for c in circuits]
    missing = [m.to(param.device) for m in missing]
    sums, clean_sum, corrupted_sum, examples = [0.0] * len(circuits), 0.0, 0.0, 0
    with torch.no_grad(), wired(model, graph) as wiring:
        for batch in chunks(batches, n_sources=graph.n_forward, d_model=d_model, max_delta_mb=max_delta_mb,
                            dtype=param.dtype):
            rows, pos = batch.clean.shape
            mask = None if batch.attention_mask is None else batch.attention_mask.to(param.device)
            clean_ids = batch.clean.to(param.device)
            corrupted = torch.zeros(rows, pos, graph.n_forward, d_model, dtype=param.dtype, device=param.device)
            logits = wiring.run(batch.corrupted.to(param.device), attention_mask=mask, tap=Record(corrupted))
            corrupted_sum += float(metric(logits, batch)) * rows
            clean_sum += float(metric(wiring.run(clean_ids, attention_mask=mask), batch)) * rows
            for i, miss in enumerate(missing):
                tap = Patch(graph, corrupted.clone(), miss)
                sums[i] += float(metric(wiring.run(clean_ids, attention_mask=mask, tap=tap), batch)) * rows
            examples += rows
    if examples == 0:
        raise ConfigError("evaluation got no examples; pass at least one non-empty batch")
    return Evaluation(tuple(s / examples for s in sums), clean_sum / examples, corrupted_sum / examples, examples)


def exact_scores(model, graph: Graph, batches: Iterable[Contrast], metric: Metric, *,
                 max_delta_mb: float = DEFAULT_MAX_DELTA_MB) -> Graph:
    """Ground truth for attribution: s(u -> v) = m(every edge but u -> v) - m(full), one patched run per edge.

    Costs one clean forward per edge and chunk: use it on small models only."""
    batches = list(batches)
    fs, bs = torch.nonzero(graph.real, as_tuple=True)
    circuits = []
    for f, b in zip(fs.tolist(), bs.tolist()):
        c = graph.real.clone()
        c[f, b] = False
        circuits.append(c)
    result = evaluate(model, graph, circuits, batches, metric, max_delta_mb=max_delta_mb)
    scores = torch.zeros(graph.n_forward, graph.n_backward)
    scores[fs, bs] = torch.tensor(result.metrics) - result.clean
    return graph.with_scores(scores, method="exact", n_examples=result.n_examples)


# -- curves -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    requested: int  # edges asked of the selection
    edges: int  # edges after pruning
    nodes: int
    metric: float
    faithfulness: float


@dataclass(frozen=True)
class Curve:
    points: tuple[CurvePoint, ...]  # in the order of the requested sizes
    clean: float
    corrupted: float
    total_edges: int
    selection: str

    def edges_needed(self, level: float = 0.9) -> int | None:
        """The smallest post-prune edge count whose running-maximum faithfulness reaches ``level``
        (not interpolated); None if no circuit of the curve reaches it."""
        best = -math.inf
        for p in sorted(self.points, key=lambda p: (p.edges, p.requested)):
            if not math.isnan(p.faithfulness):
                best = max(best, p.faithfulness)
            if best >= level:
                return p.edges
        return None

    def point_for(self, level: float = 0.9) -> CurvePoint | None:
        """The point that ``edges_needed`` reads its count from."""
        edges = self.edges_needed(level)
        return None if edges is None else min((p for p in self.points if p.edges == edges),
                                             key=lambda p: p.requested)

    def _areas(self, *, log_x: bool) -> tuple[float, float]:
        pts = sorted(self.points, key=lambda p: p.requested)
        xs = [p.requested / self.total_edges for p in pts]
        if log_x:
            pts, xs = [p for p, x in zip(pts, xs) if x > 0], [math.log(x) for x in xs if x > 0]
        under = off = 0.0
        for (p1, x1), (p2, x2) in zip(zip(pts, xs), zip(pts[1:], xs[1:])):
            under += (x2 - x1) * (p1.faithfulness + p2.faithfulness) / 2
            off += (x2 - x1) * (abs(1 - p1.faithfulness) + abs(1 - p2.faithfulness)) / 2
        return under, off

    def cpr(self, *, log_x: bool = False) -> float:
        """Area under F over the requested edge fraction (MIB's CPR; higher is better)."""
        return self._areas(log_x=log_x)[0]

    def cmd(self, *, log_x: bool = False) -> float:
        """Area of |1 - F| over the requested edge fraction (MIB's CMD; 0 is best)."""
        return self._areas(log_x=log_x)[1]

    def to_dict(self) -> dict:
        return {"selection": self.selection, "total_edges": self.total_edges,
                "baselines": {"clean": self.clean, "corrupted": self.corrupted},
                "curve": [p.__dict__.copy() for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict) -> Curve:
        return cls(tuple(CurvePoint(**p) for p in data["curve"]), data["baselines"]["clean"],
                   data["baselines"]["corrupted"], data["total_edges"], data["selection"])


def log_grid(total: int) -> list[int]:
    """Requested sizes 1-9, 10-90, 100-900, ... below ``total``, then ``total`` (auto-circuit's grid);
    every size when there are fewer than 200 edges."""
    if total < 200:
        return list(range(1, total + 1))
    sizes, step = [], 1
    while step < total:
        sizes += [k * step for k in range(1, 10) if k * step < total]
        step *= 10
    return sizes + [total]


def fraction_grid(total: int, fractions: Sequence[float] = MIB_FRACTIONS) -> list[int]:
    """Requested sizes int(fraction * total) (MIB's grid)."""
    return [int(f * total) for f in fractions]


def sweep(model, graph: Graph, batches: Iterable[Contrast], metric: Metric, *, sizes: Sequence[int] | None = None,
          selection: str = "greedy", absolute: bool = True,
          max_delta_mb: float = DEFAULT_MAX_DELTA_MB) -> Curve:
    """Faithfulness of the circuits selected from ``graph``'s scores at each requested size (default:
    ``log_grid``). Circuits that prune to the same edges are evaluated once."""
    total = graph.n_real_edges
    sizes = list(sizes) if sizes is not None else log_grid(total)
    if any(n < 0 for n in sizes):
        raise ConfigError(f"circuit sizes must be >= 0, got {sorted(sizes)[:3]}")
    circuits = [select(graph, n, how=selection, absolute=absolute) for n in sizes]
    unique: dict[bytes, int] = {}
    order = []
    for c in circuits:
        key = c.in_graph.numpy().tobytes()
        order.append(unique.setdefault(key, len(unique)))
    distinct = [None] * len(unique)
    for c, i in zip(circuits, order):
        distinct[i] = c.in_graph
    result = evaluate(model, graph, distinct, batches, metric, max_delta_mb=max_delta_mb)
    points = tuple(CurvePoint(n, c.n_edges, c.n_nodes, result.metrics[i], result.faithfulness(result.metrics[i]))
                   for n, c, i in zip(sizes, circuits, order))
    return Curve(points, result.clean, result.corrupted, total, selection)
