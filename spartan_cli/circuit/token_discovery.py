"""The token-level circuit (``spartan circuit --level token``; docs/circuits.md): ``TOKEN``, this level's part in
``driver.search``.

``find_token_circuit(model, tokenizer, cfg, task=...)``:
1. The task must declare a fixed layout (``Task.fixed_layout``: position p plays one role in every prompt,
   as in ``addition`` and ``greater-than``); scores are then averaged over prompts per (edge, position).
   Other tasks raise TaskError: averaging position 7 of one template with position 7 of another means nothing.
2. Score every token edge (``token_patching.attribute_tokens``: EAP or EAP-IG per position, value and key
   paths per (query, key) pair). A gated model's attention edges are the pairs whose deterministic gate
   is open on the clean run of some prompt; a dense model's are every causal pair.
3. Sweep circuit sizes over the log grid of the token edge count and refine between the sizes that bracket
   ``cfg.faithfulness`` (as the component level does), each circuit selected (greedy from the logits, or
   top-n, then pruned) and evaluated by patching per (edge, position) -> normalized faithfulness.
4. The circuit is the smallest size whose running-max F reaches the level (else the best F); with
   ``minimize``, cut further by backward elimination (``curve.eliminate``) as at component level. Reported
   beside it: its component-level summary (an edge u -> v is in when some (u, t) -> (v, t) is, §5.2), its
   attention edges by |score| with the share of prompts whose gate is open, and, per metric position, the
   heads and attention edges on its paths into those logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from spartan_cli.circuit.census import token_census
from spartan_cli.circuit.curve import Curve, CurvePoint, SweepChoice
from spartan_cli.circuit.driver import Found, Level, curve_rows, minimized_point, search, sweep_summary
from spartan_cli.circuit.token_patching import evaluate_tokens, sweep_tokens
from spartan_cli.circuit.tokens import TokenGraph, select_tokens, selection_order
from spartan_cli.circuit.tokens import prune as prune_tokens
from spartan_cli.errors import ConfigError, TaskError

TOKEN_NOTE = ("token level: nodes (component, position); residual edges at one position; attention edges key "
              "position -> query position inside a head, only where the deterministic gate is open on the clean "
              "run (gated) or every causal pair (dense); scores are means over prompts per (edge, position)")


@dataclass(frozen=True)
class TokenCircuitResult(SweepChoice):
    """The token-level circuit of one model (the same reading interface as discovery.CircuitResult)."""

    name: str
    gated: bool
    graph: TokenGraph  # every token edge's score; ``in_graph`` = the chosen circuit
    curve: Curve
    refined: Curve
    level: float
    timing: dict
    n_examples: int
    minimized: CurvePoint | None = None  # the minimized circuit (``graph.in_graph``), or None

    kind = "token"  # export.write_all and read_circuit dispatch on it

    def anatomy(self, *, top: int = 20) -> dict:
        """The circuit read off: counts, its component summary, top attention edges, paths per metric position."""
        g = self.graph
        comp = g.component_circuit()
        attn = [e for e in g.edges(in_graph_only=True, order="score") if e.type == "attn"]
        share = g.open_share

        def attn_rec(e):
            rec = {"src": e.src, "dst": e.dst, "score": e.score}
            if share is not None:
                from spartan_cli.circuit.tokens import _parse

                layer, head, _, j = _parse(e.src)
                rec["open_share"] = float(share[layer, head, _parse(e.dst)[3], j])
            return rec

        return {
            "token_edges": g.n_edges, "token_nodes": g.n_nodes,
            "residual_edges": int(g.in_graph[:g.n_residual].sum()), "attention_edges": len(attn),
            "attention_pairs": g.attention_pairs_in_circuit(),
            "graph": {"token_edges": g.n_real_edges, "residual_edges": g.n_residual, "attention_edges": g.n_attn,
                      "scored_edges": int((g.scores != 0).sum()),  # edges the corruption reaches (others are no-ops)
                      "attention_pairs": int(g.attn_pairs.sum()), "positions": g.n_pos,
                      "metric_positions": list(g.metric_positions)},
            "component": {"edges": comp.n_edges, "nodes": comp.n_nodes, "total_edges": comp.n_real_edges,
                          "heads": sorted(n.name for n in comp.nodes() if n.kind == "attn" and n.in_graph),
                          "mlps": sorted(n.name for n in comp.nodes() if n.kind == "mlp" and n.in_graph)},
            "top_attention_edges": [attn_rec(e) for e in attn[:top]],
            "by_metric_position": paths_by_position(g),
        }

    def summary(self) -> dict:
        return {
            "name": self.name, "gated": self.gated, "level_kind": "token", "note": TOKEN_NOTE,
            "gates": self.graph.meta.get("gate_policy"),
            "method": self.graph.meta.get("method"), "ig_steps": self.graph.meta.get("ig_steps"),
            "selection": self.curve.selection, "n_examples": self.n_examples, **sweep_summary(self),
            "total_nodes": self.graph.n_nodes_total - self.graph.n_pos + len(self.graph.metric_positions),
            "anatomy": self.anatomy(),
            "edge_types": token_census(self.graph),
            "timing": dict(self.timing),
            "curve": curve_rows(self),
        }

    def to_dict(self) -> dict:
        g = self.graph.to_dict()
        return {"summary": self.summary(), "cfg": g["cfg"], "nodes": g["nodes"], "edges": g["edges"],
                "token_edges": g["token_edges"], "curve": curve_rows(self),
                "baselines": {"clean": self.curve.clean, "corrupted": self.curve.corrupted}}

    @classmethod
    def from_dict(cls, d: dict) -> TokenCircuitResult:
        s = d["summary"]
        graph = TokenGraph.from_dict({"schema_version": d.get("schema_version", 1), "cfg": d["cfg"],
                                      "token_edges": d["token_edges"]})
        points = [CurvePoint(p["requested"], p["edges"], p["nodes"], p["metric"],
                             math.nan if p["faithfulness"] is None else p["faithfulness"]) for p in d["curve"]]
        grid = tuple(p for p, row in zip(points, d["curve"]) if row["grid"])
        clean, corrupted = d["baselines"]["clean"], d["baselines"]["corrupted"]
        make = lambda pts: Curve(tuple(pts), clean, corrupted, s["total_edges"], s["selection"])  # noqa: E731
        return cls(name=s["name"], gated=s["gated"], graph=graph, curve=make(grid), refined=make(points),
                   level=s["level"], timing=dict(s["timing"]), n_examples=s["n_examples"],
                   minimized=minimized_point(s))


def paths_by_position(graph: TokenGraph) -> dict[str, dict]:
    """Per metric position t in the circuit: the heads (``a1.h2@9``) and attention edges on its paths into
    ``logits@t``, attention edges by |score|."""
    import networkx as nx

    from spartan_cli.circuit.tokens import token_networkx

    g = token_networkx(graph)
    out = {}
    for t in graph.metric_positions:
        sink = f"logits@{t}"
        if sink not in g:
            continue
        upstream = nx.ancestors(g, sink) | {sink}
        sub = g.subgraph(upstream)
        attn = sorted(((u, v, a) for u, v, a in sub.edges(data=True) if a["type"] == "attn"),
                      key=lambda x: -abs(x[2]["score"]))
        out[str(t)] = {"heads": sorted(n for n, a in sub.nodes(data=True) if a["kind"] == "attn"),
                       "attention_edges": [{"src": u, "dst": v, "score": a["score"]} for u, v, a in attn],
                       "edges": sub.number_of_edges()}
    return out


def check_layout(task) -> None:
    if not getattr(task, "fixed_layout", False):
        raise TaskError(f"token-level circuits average scores per position, so every prompt must share one layout; "
                        f"task {task.spec!r} does not (its prompts differ in length or template). Use --level "
                        "component, or a fixed-layout task (addition, greater-than, induction)")


def _check(cfg, task) -> None:
    if cfg.attribution not in ("eap", "eap-ig-inputs"):
        raise ConfigError(f"method {cfg.method!r} is not available at token level; use eap or eap-ig")
    check_layout(task)


def _attribute(model, batches, *, cfg, metric, meta, gated, on_step) -> TokenGraph:
    from spartan_cli.circuit.graph import Graph
    from spartan_cli.circuit.token_patching import attribute_tokens

    return attribute_tokens(model, batches, metric=metric,
                            ig_steps=cfg.ig_steps if cfg.attribution == "eap-ig-inputs" else 1,
                            graph=Graph.from_model(model), max_delta_mb=cfg.max_delta_mb, meta=meta,
                            on_step=on_step, gate_gradient=cfg.gate_gradient)


def _select(scored: TokenGraph, requested: int, selection: str) -> TokenGraph:
    return select_tokens(scored, requested, order=selection_order(scored, selection))


def _finish(model, batches, found: Found, cfg, say) -> TokenCircuitResult:
    return TokenCircuitResult(name=found.name, gated=found.gated, graph=found.graph, curve=found.curve,
                              refined=found.refined, level=found.level, timing=found.timing,
                              n_examples=found.n_examples, minimized=found.minimized)


TOKEN = Level(name="token", prefix="token ", attribute=_attribute, sweep=sweep_tokens, select=_select,
              evaluate=evaluate_tokens, prune=prune_tokens, finish=_finish, check=_check)


def find_token_circuit(model, tokenizer, cfg, *, task, name: str | None = None,
                       on_progress: Callable | None = None) -> TokenCircuitResult:
    """``driver.search`` on the token graph (steps 1-4 of the module docstring)."""
    return search(model, tokenizer, cfg, task=task, level=TOKEN, name=name, on_progress=on_progress)


__all__ = ["TOKEN", "TOKEN_NOTE", "TokenCircuitResult", "check_layout", "find_token_circuit", "paths_by_position"]
