"""Faithfulness, curves and their reading, shared by component and token circuits (docs/circuits.md).

- ``faithfulness``: F(C) = (m(C) - m(empty)) / (m(full) - m(empty)); ``Evaluation`` holds a patched sweep's means.
- ``Curve``: F against circuit size; the edges needed for a level are read off the running maximum of F
  (curves are not monotone); CPR and CMD are trapezoid areas of F and |1 - F| over the requested edge
  fraction, as in MIB. ``log_grid``/``fraction_grid``: the requested sizes; ``refine_sizes``: the sizes
  between the two that bracket a level.
- ``sweep_curve``: select at every size, evaluate each distinct circuit once, build the Curve: one body for
  both graph types, which pass their own ``select`` and ``evaluate``.
- ``eliminate`` (``--minimize``): backward elimination, as ACDC prunes. The sweep's circuit is a prefix of
  one score ranking, so it can hold edges that rank high but matter little; this visits the circuit's
  edges, lowest |score| first, drops each one whose removal (then pruning) keeps F >= the level, and
  repeats the pass until one drops nothing: a circuit from which no single edge can go. One patched
  evaluation per edge per pass (usually two or three passes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spartan_cli.errors import ConfigError

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


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


def refine_sizes(curve: Curve, level: float, *, points: int) -> list[int]:
    """Requested sizes strictly between the last size whose running max is below ``level`` and the first
    that reaches it, ``points`` of them evenly spaced (every size when fewer fit); [] if nothing to refine."""
    hit = curve.point_for(level)
    if hit is None:
        return []
    below = [p.requested for p in curve.points if p.requested < hit.requested]
    low = max(below, default=0)
    gap = hit.requested - low
    if gap <= 1:
        return []
    if gap - 1 <= points:
        return list(range(low + 1, hit.requested))
    sizes = {low + round(gap * i / (points + 1)) for i in range(1, points + 1)}
    return sorted(s for s in sizes if low < s < hit.requested)


def sweep_curve(graph, sizes: Sequence[int] | None, selection: str, *, select_at: Callable,
                evaluate_with: Callable[[list], Evaluation]) -> Curve:
    """F of the circuits ``select_at(n)`` (a graph of ``graph``'s type) at each requested size (default:
    ``log_grid`` of the graph's edges); circuits that prune to the same edges are evaluated once, by
    ``evaluate_with(list of in_graph tensors)``."""
    total = graph.n_real_edges
    sizes = list(sizes) if sizes is not None else log_grid(total)
    if any(n < 0 for n in sizes):
        raise ConfigError(f"circuit sizes must be >= 0, got {sorted(sizes)[:3]}")
    circuits = [select_at(n) for n in sizes]
    unique: dict[bytes, int] = {}
    index = [unique.setdefault(c.in_graph.numpy().tobytes(), len(unique)) for c in circuits]
    distinct = [None] * len(unique)
    for c, i in zip(circuits, index):
        distinct[i] = c.in_graph
    result = evaluate_with(distinct)
    points = tuple(CurvePoint(n, c.n_edges, c.n_nodes, result.metrics[i], result.faithfulness(result.metrics[i]))
                   for n, c, i in zip(sizes, circuits, index))
    return Curve(points, result.clean, result.corrupted, total, selection)
