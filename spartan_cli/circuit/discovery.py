"""The component-level circuit: nodes are components, edges their residual-stream reads (docs/circuits.md).

``COMPONENT`` is this level's part in ``driver.search``: attribution over the component graph
(``attribute``: EAP, EAP-IG or exact), sweeps by edge patching (``faithfulness.sweep``), selection and
pruning (``select``). Its result, ``CircuitResult``, adds what the component graph reads off:
- heads ranked by the summed |score| of the edges into and out of them (``top_heads``);
- attention edges: on the clean prompts, the (query, key) pairs each circuit head can read, every causal
  pair in a dense model, the open gates in a gated one (the token-level size of the circuit's attention).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

from spartan_cli.circuit.census import component_census
from spartan_cli.circuit.curve import Curve, CurvePoint, SweepChoice
from spartan_cli.circuit.driver import (CircuitConfig, Found, Level, curve_rows, minimized_point, search,
                                        sweep_summary)
from spartan_cli.circuit.faithfulness import evaluate, sweep
from spartan_cli.circuit.graph import Graph
from spartan_cli.circuit.select import prune, select

GATES_NOTE = ("deterministic gates 1[g > 0] in attribution and patching; gates are recomputed from the patched "
              "q/k in every patched run; EAP gradients pass the gates as gate_gradient says (hard: zero; "
              "straight-through: sigmoid'(g))")


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class NodeScore:
    """A component and the summed |score| of the edges into and out of it."""

    name: str  # "a3.h1", "m2"
    score: float
    in_circuit: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttentionEdges:
    """Token-level size of the circuit's attention on the clean prompts, per prompt (means)."""

    circuit: float  # (query, key) pairs circuit heads can read: open gates (gated) or causal pairs (dense)
    all_heads: float  # the same over every head of the model
    causal: float  # causal (allowed) pairs over every head: what a dense model reads

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CircuitResult(SweepChoice):
    """The circuit of one model: scores, the curve, the chosen circuit and what it took."""

    name: str  # the model as the user gave it
    gated: bool
    graph: Graph  # every edge's score; ``in_graph`` = the chosen circuit
    curve: Curve  # the log-grid sweep (CPR/CMD are read from it)
    refined: Curve  # grid + refinement sizes (edges needed are read from it)
    level: float  # the faithfulness asked for
    top_heads: tuple[NodeScore, ...]
    attention: AttentionEdges | None
    timing: dict[str, float]  # seconds: attribution, sweep, refine, (minimize,) total, and one clean forward
    n_examples: int
    minimized: CurvePoint | None = None  # the minimized circuit (``graph.in_graph``), or None

    def summary(self) -> dict:
        """Everything but the per-edge scores (what report.json and ``--json`` carry)."""
        return {
            "name": self.name, "gated": self.gated, "gates": GATES_NOTE if self.gated else None,
            "method": self.graph.meta.get("method"), "ig_steps": self.graph.meta.get("ig_steps"),
            "selection": self.curve.selection, "n_examples": self.n_examples, **sweep_summary(self),
            "total_nodes": len(self.graph.source_names) + 1,
            "top_heads": [h.to_dict() for h in self.top_heads],
            "attention_edges": None if self.attention is None else self.attention.to_dict(),
            "edge_types": component_census(self.graph),
            "timing": dict(self.timing),
            "curve": curve_rows(self),
        }

    def to_dict(self) -> dict:
        """The summary plus the graph (EAP-IG layout: cfg, nodes, edges); ``from_dict`` reads it back."""
        g = self.graph.to_dict()
        scores = node_scores(self.graph)
        nodes = {name: {**rec, "score": scores.get(name, 0.0)} for name, rec in g["nodes"].items()}
        return {"summary": self.summary(), "cfg": g["cfg"], "nodes": nodes, "edges": g["edges"],
                "curve": curve_rows(self), "baselines": {"clean": self.curve.clean, "corrupted": self.curve.corrupted}}

    @classmethod
    def from_dict(cls, d: dict) -> CircuitResult:
        s = d["summary"]
        graph = Graph.from_dict({"cfg": d["cfg"], "edges": d["edges"]})
        points = [CurvePoint(p["requested"], p["edges"], p["nodes"], p["metric"],
                             math.nan if p["faithfulness"] is None else p["faithfulness"]) for p in d["curve"]]
        grid = tuple(p for p, row in zip(points, d["curve"]) if row["grid"])
        clean, corrupted = d["baselines"]["clean"], d["baselines"]["corrupted"]
        make = lambda pts: Curve(tuple(pts), clean, corrupted, s["total_edges"], s["selection"])  # noqa: E731
        att = s.get("attention_edges")
        return cls(name=s["name"], gated=s["gated"], graph=graph, curve=make(grid), refined=make(points),
                   level=s["level"], top_heads=tuple(NodeScore(**h) for h in s["top_heads"]),
                   attention=None if att is None else AttentionEdges(**att), timing=dict(s["timing"]),
                   n_examples=s["n_examples"], minimized=minimized_point(s))


# ------------------------------------------------------------------------------------------ verbs
def node_scores(graph: Graph) -> dict[str, float]:
    """Summed |score| of the edges into and out of every node (the logits: into; the input: out of)."""
    s = graph.scores.abs()  # (n_forward, n_backward)
    out = s.sum(dim=1)  # (n_forward,)
    into = s.sum(dim=0)  # (n_backward,)
    total = out.clone()
    owner = graph.slot_owner
    heads_and_mlps = owner >= 0
    total.index_add_(0, owner[heads_and_mlps], into[heads_and_mlps])
    scores = dict(zip(graph.source_names, total.tolist()))
    scores["logits"] = float(into[graph.logits_slot])
    return scores


def top_heads(graph: Graph, k: int = 10) -> tuple[NodeScore, ...]:
    """The k heads with the largest summed |score| (``node_scores``), best first."""
    scores = node_scores(graph)
    inside = {n.name for n in graph.nodes() if n.in_graph}
    heads = sorted(((s, n) for n, s in scores.items() if n.startswith("a")), key=lambda t: -t[0])[:k]
    return tuple(NodeScore(n, s, n in inside) for s, n in heads)


def attention_edges(model, batches, circuit: Graph) -> AttentionEdges:
    """Mean (query, key) pairs per prompt that the circuit's heads can read on the clean prompts.

    Gated models: open deterministic gates (g > 0) on allowed pairs; dense models: every allowed pair."""
    import torch

    from spartan_cli.gating.attention import is_gated
    from spartan_cli.gating.scopes import evaluating, keeping_gate_logits

    inside = torch.zeros(circuit.n_layers, circuit.n_heads, dtype=torch.bool)  # (n_layers, n_heads)
    for node in circuit.nodes():
        if node.kind == "attn" and node.in_graph:
            inside[node.layer, node.head] = True
    gated = is_gated(model)
    device = next(model.parameters()).device
    circ = every = causal = 0.0
    rows = 0
    with torch.no_grad(), evaluating(model), (keeping_gate_logits(model) if gated else nullcontext()) as states:
        for batch in batches:
            mask = batch.attention_mask
            lengths = (mask.sum(1) if mask is not None
                       else torch.full((len(batch),), batch.clean.shape[1])).double()  # (batch,)
            allowed = float((lengths * (lengths + 1) / 2).sum())  # causal pairs per head, summed over rows
            causal += allowed * circuit.n_layers * circuit.n_heads
            rows += len(batch)
            if not gated:
                circ += allowed * int(inside.sum())
                every += allowed * circuit.n_layers * circuit.n_heads
                continue
            model(input_ids=batch.clean.to(device), attention_mask=None if mask is None else mask.to(device))
            for layer, state in enumerate(states):
                opened = state.gate_logits > 0  # (batch, n_heads, q, k); padded keys are -inf
                if mask is not None:  # padded queries read real keys: not part of any prompt
                    opened = opened & mask.to(opened.device).bool()[:, None, :, None]
                opened = opened.sum(dim=(0, 2, 3)).cpu().double()  # (n_heads,)
                circ += float(opened[inside[layer]].sum())
                every += float(opened.sum())
    return AttentionEdges(circuit=circ / rows, all_heads=every / rows, causal=causal / rows)


def _attribute(model, batches, *, cfg, metric, meta, gated, on_step) -> Graph:
    from spartan_cli.circuit.attribute import attribute

    meta = {**meta, "method": cfg.attribution, "ig_steps": cfg.ig_steps if cfg.attribution == "eap-ig-inputs" else None,
            "gated": gated, "gates": GATES_NOTE if gated else None,
            "gate_gradient": cfg.gate_gradient if gated and cfg.attribution != "exact" else None}
    return attribute(model, batches, metric=metric, method=cfg.attribution, ig_steps=cfg.ig_steps,
                     graph=Graph.from_model(model, meta=meta), max_delta_mb=cfg.max_delta_mb, on_step=on_step,
                     gate_gradient=cfg.gate_gradient)


def _finish(model, batches, found: Found, cfg, say) -> CircuitResult:
    from spartan_cli.progress import Progress

    say(Progress(f"attention edges of {found.name}", 0, None))
    attention = attention_edges(model, batches, found.graph)
    return CircuitResult(name=found.name, gated=found.gated, graph=found.graph, curve=found.curve,
                         refined=found.refined, level=found.level, top_heads=top_heads(found.graph, cfg.top_heads),
                         attention=attention, timing=found.timing, n_examples=found.n_examples,
                         minimized=found.minimized)


def _select(scored: Graph, requested: int, selection: str) -> Graph:
    return select(scored, requested, how=selection)


COMPONENT = Level(name="component", prefix="", attribute=_attribute, sweep=sweep, select=_select,
                  evaluate=evaluate, prune=prune, finish=_finish)


def find_component_circuit(model, tokenizer, cfg: CircuitConfig, *, task, name: str | None = None,
                           on_progress: Callable | None = None) -> CircuitResult:
    """``driver.search`` on the component graph -> CircuitResult."""
    return search(model, tokenizer, cfg, task=task, level=COMPONENT, name=name, on_progress=on_progress)


__all__ = ["COMPONENT", "GATES_NOTE", "AttentionEdges", "CircuitResult", "NodeScore", "attention_edges",
           "find_component_circuit", "node_scores", "top_heads"]
