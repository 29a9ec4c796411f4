"""Edge-patching evaluation of circuits, normalized faithfulness, and the faithfulness-vs-edges curve.

Evaluating a circuit C (docs/circuits.md, "Choosing and checking a circuit", EAP-IG ``evaluate_graph``), per chunk of rows:
1. Corrupted forward: delta[u] = a_u^corr for every source u. Its metric, scored with the clean
   batch's answers, is m(empty).
2. Clean forward without intervention: m(full).
3. For each circuit, a clean forward in which every source subtracts its current output,
   delta[u] -= a_u, and every destination v reads x_v + sum over parents u with (u -> v) not in C of
   delta[u]. Sources fire in forward order, so delta[u] is final before any reader uses it: edges
   outside C carry corrupted values, edges inside carry the values of this intervened run.
4. Metrics are averaged over examples; then F(C) = (m(C) - m(empty)) / (m(full) - m(empty)).
The corrupted activations of a chunk are computed once and shared by every circuit of a sweep.

Curves (docs/circuits.md): circuits of increasing requested size (greedy or top-n, then pruned); the
edges needed for a faithfulness level are read off the running maximum of F (curves are not monotone);
CPR and CMD are trapezoid areas of F and |1 - F| over the requested edge fraction, as in MIB.

Minimizing (``eliminate``): the sweep's circuit is a prefix of one score ranking, so it can hold edges
that rank high but matter little. Backward elimination, as ACDC prunes, visits the circuit's edges,
lowest |score| first, drops each one whose removal (then pruning) keeps F >= the level, and repeats the
pass until one drops nothing: a circuit from which no single edge can go. One patched evaluation per
edge per pass (usually two or three passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
        self.delta[start:start + out.shape[2]] -= out.permute(2, 0, 1, 3)
        return out

    def destination(self, start, x):
        n = x.shape[2]
        if not any(self.slot_patched[start:start + n]):
            return x
        prev = int(self.graph.n_upstream[start])
        _, rows, pos, d_model = self.delta.shape
        weights = self.missing[:prev, start:start + n].T  # (n, prev)
        patch = (weights @ self.delta[:prev].reshape(prev, -1)).view(n, rows, pos, d_model)
        return x + patch.permute(1, 2, 0, 3)  # (rows, pos, n, d_model)


@dataclass(frozen=True)
class EvaluationStep:
    """Progress of an evaluation: examples done, and patched runs done on the current chunk of rows."""

    examples: int
    circuits_done: int
    circuits: int


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


def evaluate(model, batches: Iterable[Contrast], *, metric: Metric, circuits: Sequence[Graph | torch.Tensor],
             graph: Graph | None = None, max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
             on_step: Callable[[EvaluationStep], None] | None = None) -> Evaluation:
    """Mean metric of every circuit under edge patching, with m(full) and m(empty).

    A circuit is a Graph or an ``in_graph`` (n_forward, n_backward) bool tensor of ``graph`` (default: the
    first circuit's graph, else the model's). Circuits are read one at a time, so a lazy sequence keeps
    memory flat. No gradients; the model is wired for the call only."""
    from spartan_cli.models import model_shape

    if graph is None:
        graph = circuits[0] if circuits and isinstance(circuits[0], Graph) else Graph.from_model(model)
    param = next(model.parameters())
    d_model = model_shape(model).d_model
    real = graph.real.to(param.device)
    sums, clean_sum, corrupted_sum, examples = [0.0] * len(circuits), 0.0, 0.0, 0
    with torch.no_grad(), wired(model, graph) as wiring:
        for batch in chunks(batches, n_sources=graph.n_forward, d_model=d_model, max_delta_mb=max_delta_mb,
                            dtype=param.dtype):
            rows, pos = batch.clean.shape
            mask = None if batch.attention_mask is None else batch.attention_mask.to(param.device)
            clean_ids = batch.clean.to(param.device)
            corrupted = torch.empty(graph.n_forward, rows, pos, d_model, dtype=param.dtype, device=param.device)
            logits = wiring.run(batch.corrupted.to(param.device), attention_mask=mask, tap=Record(corrupted))
            corrupted_sum += float(metric(logits, batch)) * rows
            clean_sum += float(metric(wiring.run(clean_ids, attention_mask=mask), batch)) * rows
            for i, circuit in enumerate(circuits):
                in_graph = circuit.in_graph if isinstance(circuit, Graph) else circuit
                tap = Patch(graph, corrupted.clone(), real & ~in_graph.to(param.device, torch.bool))
                sums[i] += float(metric(wiring.run(clean_ids, attention_mask=mask, tap=tap), batch)) * rows
                if on_step is not None:
                    on_step(EvaluationStep(examples, i + 1, len(circuits)))
            examples += rows
    if examples == 0:
        raise ConfigError("evaluation got no examples; pass at least one non-empty batch")
    return Evaluation(tuple(s / examples for s in sums), clean_sum / examples, corrupted_sum / examples, examples)


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

    def point_for(self, level: float = 0.9) -> CurvePoint | None:
        """The smallest circuit (by post-prune edges) at which the running maximum of F reaches ``level``:
        F is not monotone in the edge count, so a later dip does not undo an earlier success. Its own F is
        >= ``level``. None if no circuit of the curve reaches it. Not interpolated."""
        best = -math.inf
        for p in sorted(self.points, key=lambda p: (p.edges, p.requested)):
            if math.isnan(p.faithfulness) or p.faithfulness <= best:
                continue
            best = p.faithfulness
            if best >= level:
                return p
        return None

    def edges_needed(self, level: float = 0.9) -> int | None:
        """Post-prune edge count of ``point_for(level)``."""
        point = self.point_for(level)
        return None if point is None else point.edges

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


class SweepChoice:
    """What a circuit search reads off its refined curve; mixed into the component and token results,
    which carry ``refined`` (a Curve), ``level`` (the faithfulness asked for) and ``minimized`` (the
    minimized circuit's point, or None when the search did not minimize)."""

    refined: Curve
    level: float
    minimized: CurvePoint | None

    @property
    def needed(self) -> CurvePoint | None:
        """The circuit reported as needed for ``level``: the minimized one, else the sweep's ``point``."""
        return self.minimized or self.point

    @property
    def point(self) -> CurvePoint | None:
        """The smallest circuit whose running-max F reaches ``level``; None if none does."""
        return self.refined.point_for(self.level)

    @property
    def best(self) -> CurvePoint:
        """The highest F of the sweep (fewest edges among ties)."""
        ok = [p for p in self.refined.points if not math.isnan(p.faithfulness)]
        return max(ok, key=lambda p: (p.faithfulness, -p.edges)) if ok else self.refined.points[-1]

    @property
    def reached(self) -> bool:
        return self.point is not None

    @property
    def chosen(self) -> CurvePoint:
        """The point whose circuit the result's graph holds: ``point``, else ``best``."""
        return self.point or self.best


def eliminate(scored, circuit, point: CurvePoint, *, evaluate_with: Callable[[list], Evaluation],
              prune: Callable, level: float,
              on_step: Callable[[int, int, int], None] | None = None) -> tuple[object, CurvePoint]:
    """Backward elimination (module docstring) of ``circuit``, the selection at the sweep's ``point``.

    ``scored`` and ``circuit`` are one graph type (a component Graph or a TokenGraph: ``in_graph``,
    ``scores``, ``with_circuit``, ``n_edges``, ``n_nodes``); ``evaluate_with(circuits)`` evaluates a list of
    ``in_graph`` tensors (``evaluate`` or ``evaluate_tokens`` bound to the model and batches); ``prune(graph,
    in_graph)`` is that graph type's pruning. Returns (the minimized circuit, its point: same requested
    size, its edges, nodes, metric and F; ``point`` itself when no edge could go). ``on_step(pass, tried,
    edges)`` after each try: pass number (from 1), edges tried in it, and the edges it visits."""
    current = circuit.in_graph.bool().clone()
    magnitude = scored.scores.flatten().abs()
    kept, passes, dropped = None, 0, True
    while dropped:  # F is not monotone: an edge kept early may go once others have gone
        dropped = False
        order = torch.nonzero(current.flatten()).flatten()
        order = order[torch.argsort(magnitude[order], stable=True)].tolist()  # lowest |score| first
        passes += 1
        for tried, i in enumerate(order, 1):
            if current.flatten()[i]:  # still there (an earlier drop may have pruned it)
                trial = current.clone()
                trial.view(-1)[i] = False
                trial = prune(scored, trial)
                result = evaluate_with([trial])
                metric = result.metrics[0]
                f = result.faithfulness(metric)
                if not math.isnan(f) and f >= level:
                    current, kept, dropped = trial, (metric, f), True
            if on_step is not None:
                on_step(passes, tried, len(order))
    if kept is None:
        return circuit, point
    circuit = scored.with_circuit(current)
    return circuit, CurvePoint(point.requested, circuit.n_edges, circuit.n_nodes, *kept)


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


def sweep(model, batches: Iterable[Contrast], *, metric: Metric, graph: Graph, sizes: Sequence[int] | None = None,
          selection: str = "greedy", absolute: bool = True, max_delta_mb: float = DEFAULT_MAX_DELTA_MB,
          on_step: Callable[[EvaluationStep], None] | None = None) -> Curve:
    """Faithfulness of the circuits selected from ``graph``'s scores (from ``attribute``) at each requested
    size (default: ``log_grid``). Circuits that prune to the same edges are evaluated once."""
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
    result = evaluate(model, batches, metric=metric, circuits=distinct, graph=graph, max_delta_mb=max_delta_mb,
                      on_step=on_step)
    points = tuple(CurvePoint(n, c.n_edges, c.n_nodes, result.metrics[i], result.faithfulness(result.metrics[i]))
                   for n, c, i in zip(sizes, circuits, order))
    return Curve(points, result.clean, result.corrupted, total, selection)
