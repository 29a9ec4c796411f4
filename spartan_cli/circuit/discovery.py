"""Find a task's circuit in one model, and in its base model beside it (what ``spartan circuit`` calls).

``find_circuit(model, tokenizer, cfg)``:
1. Build the task's minimal pairs for the tokenizer (``Task.contrast``: clean/corrupted prompts of one
   length, right-padded, and the answers its metric reads) and cut them into batches of ``batch_size``.
2. Score every edge of the component graph with EAP or EAP-IG (``attribute``). A gated model runs with
   deterministic gates, 1[g > 0], in attribution and in patching; under patching the gates are recomputed
   from the patched q/k (a corrupted key may open or shut a gate), and no gradient crosses the threshold.
3. Sweep circuit sizes over auto-circuit's log grid (1-9, 10-90, 100-900, ..., all edges; docs/circuits.md,
   "Choosing and checking a circuit"), selecting (greedy or top-n, then pruned) and evaluating each by edge patching -> normalized
   faithfulness F against post-prune edges. CPR/CMD are areas over this grid, so any two models of one
   architecture are compared on the same fractions.
4. Refine: the running maximum of F first reaches ``faithfulness`` between two grid sizes; sweep
   ``refine_points`` evenly spaced sizes between them, ``refine_rounds`` times, so the edges needed are
   exact (or within a few percent on large graphs) instead of the grid's next decade. Not interpolated.
5. The circuit is the selection at the smallest size whose running-max F reaches the level, or, if none
   does, at the size with the best F. With ``minimize`` a circuit that reaches the level is then cut by
   backward elimination (``faithfulness.eliminate``: no single edge can leave it and keep F >= the level),
   and its edges are the ones reported as needed. Heads are ranked by summed |score| of the edges into and
   out of them.
6. Attention edges: on the clean prompts, the (query, key) pairs each circuit head can read: every causal
   pair in a dense model, the open gates in a gated one (token-level size of the circuit's attention).
With ``level="token"`` steps 2-6 are token_discovery's: the graph's nodes are components at positions and
its attention edges (query, key) pairs, each scored, patched and counted.
``circuit_run(cfg)`` loads the model (a spartan checkpoint or any model ``load_model`` takes), runs
``find_circuit`` on it and, with ``compare_base``, frees it, loads the checkpoint's base model and does
the same on identical pairs, one model in memory at a time.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

from spartan_cli.circuit.faithfulness import Curve, CurvePoint, SweepChoice
from spartan_cli.circuit.graph import Graph
from spartan_cli.errors import ConfigError

log = logging.getLogger(__name__)

# what the CLI calls a method -> the attribution registry's name (attribute.METHODS)
METHOD_NAMES = {"eap": "eap", "eap-ig": "eap-ig-inputs", "exact": "exact"}
LEVELS = ("component", "token")  # graph granularity: find_circuit (below) or token_discovery.find_token_circuit
GATES_NOTE = ("deterministic gates 1[g > 0] in attribution and patching; gates are recomputed from the patched "
              "q/k in every patched run; EAP gradients pass the gates as gate_gradient says (hard: zero; "
              "straight-through: sigmoid'(g))")


@dataclass(frozen=True)
class CircuitConfig:
    """Settings of ``spartan circuit``."""

    model: str  # checkpoint directory, HF directory, hub id or built-in name
    task: str | None = None  # task spec (tasks.TASKS, ``name:argument``); None: the built-in model's own task
    method: str = "eap-ig"  # eap | eap-ig (EAP-IG-inputs) | exact (one patched run per edge: tiny models only)
    ig_steps: int = 5  # EAP-IG integration steps (the paper's 5)
    n_examples: int | None = None  # minimal pairs to build; None: the task's default
    batch_size: int = 32  # pairs per forward
    selection: str = "greedy"  # greedy | topn (select.SELECTIONS)
    faithfulness: float = 0.9  # the level whose circuit is reported, in (0, 1]
    refine_rounds: int = 2  # sweeps between the grid sizes that bracket the level (0: grid only)
    refine_points: int = 9  # sizes per refinement sweep
    compare_base: bool = False  # also find the circuit of the checkpoint's base model
    baseline: str | None = None  # base model to compare with; None: spartan.json base_model
    seed: int = 0  # which pairs the task draws
    max_delta_mb: float = 512.0  # cap on the activation-difference buffer (sources x rows x pos x d_model)
    top_heads: int = 10  # heads listed by summed |score|
    device: str = "auto"
    trust_remote_code: bool = False
    level: str = "component"  # component (component graph, §3) | token (nodes at positions, §5; fixed-layout tasks)
    gate_gradient: str = "straight-through"  # gated models, eap/eap-ig: backward through the gates (GATE_GRADIENTS)
    minimize: bool = False  # backward elimination of the circuit that reaches the level (faithfulness.eliminate)

    def __post_init__(self):
        from spartan_cli.circuit.attribute import GATE_GRADIENTS, METHODS
        from spartan_cli.circuit.select import SELECTIONS

        if self.method not in METHOD_NAMES and self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; choose one of {', '.join(sorted(METHOD_NAMES))}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection {self.selection!r} is unknown; choose one of {', '.join(sorted(SELECTIONS))}")
        if not (isinstance(self.faithfulness, (int, float)) and 0 < self.faithfulness <= 1):
            raise ConfigError(f"faithfulness must be in (0, 1], got {self.faithfulness!r}; e.g. 0.9 for 90% of the "
                              "clean metric recovered")
        for name, low in (("ig_steps", 1), ("batch_size", 1), ("refine_points", 1), ("top_heads", 0),
                          ("refine_rounds", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ConfigError(f"n_examples must be >= 1, got {self.n_examples!r}")
        if not self.max_delta_mb > 0:
            raise ConfigError(f"max_delta_mb must be > 0, got {self.max_delta_mb!r}")
        if self.gate_gradient not in GATE_GRADIENTS:
            raise ConfigError(f"gate_gradient {self.gate_gradient!r} is unknown; choose one of "
                              f"{', '.join(sorted(GATE_GRADIENTS))}")
        if self.level not in LEVELS:
            raise ConfigError(f"level {self.level!r} is unknown; choose one of {', '.join(LEVELS)}")
        if self.level == "token" and self.method == "exact":
            raise ConfigError("method 'exact' is not available at token level (one patched run per token edge); "
                              "use --method eap or eap-ig")

    @property
    def attribution(self) -> str:
        """The attribution registry's name of ``method``."""
        return METHOD_NAMES.get(self.method, self.method)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CircuitConfig:
        from spartan_cli.config import strict_from_dict

        return strict_from_dict(cls, d, where="circuit")


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


def _point(p: CurvePoint) -> dict:
    return {"requested": p.requested, "edges": p.edges, "nodes": p.nodes, "metric": p.metric,
            "faithfulness": p.faithfulness}


def sweep_summary(result: SweepChoice) -> dict:
    """The summary keys both searches read off their sweep: the level, the circuit needed for it (minimized
    or the sweep's), the best point, the sweep's own circuit, total edges, baselines, CPR/CMD."""
    needed, point, curve = result.needed, result.point, result.curve
    return {"level": result.level, "reached": needed is not None,
            "edges_needed": None if needed is None else needed.edges,
            "nodes_needed": None if needed is None else needed.nodes,
            "faithfulness_at": None if needed is None else needed.faithfulness,
            "circuit": _point(result.minimized or result.chosen), "best": _point(result.best),
            "minimized": result.minimized is not None, "sweep_circuit": None if point is None else _point(point),
            "total_edges": curve.total_edges, "baselines": {"clean": curve.clean, "corrupted": curve.corrupted},
            "cpr": curve.cpr(), "cmd": curve.cmd(), "cpr_log": curve.cpr(log_x=True)}


def minimized_point(summary: dict) -> CurvePoint | None:
    """The minimized circuit's point back from a summary (None when it did not minimize)."""
    if not summary.get("minimized"):
        return None
    c = summary["circuit"]
    return CurvePoint(c["requested"], c["edges"], c["nodes"], c["metric"], c["faithfulness"])


def curve_rows(result: CircuitResult) -> list[dict]:
    """The refined curve by requested size: each point, whether it is on the log grid, and the running
    maximum of F by post-prune edges (what the edges needed are read from)."""
    grid = {p.requested for p in result.curve.points}
    pts = sorted(result.refined.points, key=lambda p: (p.edges, p.requested))
    best, running = -math.inf, {}
    for p in pts:
        if not math.isnan(p.faithfulness):
            best = max(best, p.faithfulness)
        running[p.requested] = best if best > -math.inf else math.nan
    return [{**_point(p), "grid": p.requested in grid, "running_max": running[p.requested]}
            for p in sorted(result.refined.points, key=lambda p: p.requested)]


@dataclass(frozen=True)
class CircuitRun:
    """What ``circuit_run`` did: the model's circuit, the base model's (or None) and the resolved settings."""

    model: CircuitResult
    base: CircuitResult | None
    config: dict = field(default_factory=dict)
    task: dict = field(default_factory=dict)  # the task's conventions (Task.describe())

    @property
    def edge_ratio(self) -> float | None:
        """base edges needed / model edges needed: how many times smaller the model's circuit is."""
        return _ratio(self.base, self.model, "edges")

    @property
    def node_ratio(self) -> float | None:
        return _ratio(self.base, self.model, "nodes")

    def metrics(self) -> dict:
        """report.json's metrics: task, model, base, comparison."""
        comparison = None
        if self.base is not None:
            comparison = {"level": self.config.get("level", "component"),
                          "edge_ratio": self.edge_ratio, "node_ratio": self.node_ratio,
                          "both_reached": self.model.reached and self.base.reached,
                          "note": "ratio = base / model at the level; null when either does not reach it"}
        return {"task": self.task, "model": self.model.summary(),
                "base": None if self.base is None else self.base.summary(), "comparison": comparison}


def _ratio(base: CircuitResult | None, model: CircuitResult, what: str) -> float | None:
    if base is None or model.needed is None or base.needed is None:
        return None
    top, bottom = getattr(base.needed, what), getattr(model.needed, what)
    return top / bottom if bottom else math.inf


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


def batches_of(batch, size: int) -> list:
    """``batch`` cut into rows of ``size``, each trimmed to its longest prompt (right padding only)."""
    from spartan_cli.circuit.contrast import ContrastBatch

    out = []
    for start in range(0, len(batch), size):
        part = batch.slice(start, start + size)
        if part.attention_mask is not None:
            pos = int(part.attention_mask.sum(1).max())
            part = ContrastBatch(part.clean[:, :pos], part.corrupted[:, :pos], part.answers,
                                 part.attention_mask[:, :pos])
        out.append(part)
    return out


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


def attention_edges(model, batches, circuit: Graph) -> AttentionEdges:
    """Mean (query, key) pairs per prompt that the circuit's heads can read on the clean prompts.

    Gated models: open deterministic gates (g > 0) on allowed pairs; dense models: every allowed pair."""
    import torch

    from spartan_cli.evaluate import is_gated
    from spartan_cli.scopes import evaluating, keeping_gate_logits

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


def clean_forward_s(model, batch) -> float:
    """Seconds of one plain clean forward of ``batch`` (no grad, eval mode): the unit attribution costs are read in."""
    import time

    import torch

    from spartan_cli.scopes import evaluating

    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model):
        t = time.perf_counter()
        model(input_ids=batch.clean.to(device),
              attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device))
        return time.perf_counter() - t


def find_circuit(model, tokenizer, cfg: CircuitConfig, *, task=None, name: str | None = None,
                 on_progress: Callable | None = None) -> CircuitResult:
    """Steps 1-6 of the module docstring for one model -> CircuitResult.

    ``task``: a Task (default: ``get_task(cfg.task)``). ``on_progress`` takes evaluate.Progress records."""
    from spartan_cli.circuit.attribute import attribute
    from spartan_cli.circuit.faithfulness import sweep
    from spartan_cli.circuit.select import select
    from spartan_cli.evaluate import Progress, is_gated
    from spartan_cli.scopes import deterministic_gates
    from spartan_cli.tasks import get_task

    if task is None:
        if cfg.task is None:
            raise ConfigError("no task to find a circuit for; pass --task (e.g. ioi, greater-than, addition)")
        task = get_task(cfg.task)
    if cfg.level == "token":
        from spartan_cli.circuit.token_discovery import find_token_circuit

        return find_token_circuit(model, tokenizer, cfg, task=task, name=name, on_progress=on_progress)
    name = name or cfg.model
    say = on_progress or (lambda p: None)
    start = time.perf_counter()
    pairs = task.contrast(tokenizer, n=cfg.n_examples, seed=cfg.seed)  # ContrastBatch (n, pos)
    batches = batches_of(pairs, cfg.batch_size)
    gated = is_gated(model)
    meta = {"model": name, "task": task.spec, "metric": task.metric_name, "method": cfg.attribution,
            "ig_steps": cfg.ig_steps if cfg.attribution == "eap-ig-inputs" else None, "seed": cfg.seed,
            "n_examples": len(pairs), "selection": cfg.selection, "gated": gated,
            "gates": GATES_NOTE if gated else None, "corruption": task.describe().get("corruption"),
            "bos": task.describe().get("bos"),
            "gate_gradient": cfg.gate_gradient if gated and cfg.attribution != "exact" else None}
    graph = Graph.from_model(model, meta=meta)
    timing: dict[str, float] = {}
    timing["clean_forward_s"] = clean_forward_s(model, batches[0])

    n_batches = len(batches)
    with deterministic_gates(model) if gated else nullcontext():
        t = time.perf_counter()
        on_attr = counting_progress(f"attribution ({cfg.method}) of {name}", n_batches, say)
        scored = attribute(model, batches, metric=task.metric, method=cfg.attribution, ig_steps=cfg.ig_steps,
                           graph=graph, max_delta_mb=cfg.max_delta_mb, on_step=on_attr, gate_gradient=cfg.gate_gradient)
        timing["attribution_s"] = time.perf_counter() - t
        curve, refined = sweep_and_refine(
            lambda sizes, on_step: sweep(model, batches, metric=task.metric, graph=scored, sizes=sizes,
                                         selection=cfg.selection, max_delta_mb=cfg.max_delta_mb, on_step=on_step),
            scored.n_real_edges, cfg, name=name, n_batches=n_batches, say=say, timing=timing)


        probe = CircuitResult(name, gated, scored, curve, refined, cfg.faithfulness, (), None, timing, len(pairs))
        circuit = select(scored, probe.chosen.requested, how=cfg.selection)
        assert circuit.n_edges == probe.chosen.edges, (circuit.n_edges, probe.chosen)
        minimized = None
        if cfg.minimize and probe.point is not None:
            from spartan_cli.circuit.faithfulness import evaluate
            from spartan_cli.circuit.select import prune

            circuit, minimized = minimize(model, batches, task, cfg, scored, circuit, probe.point, evaluate=evaluate,
                                          prune=prune, what=f"circuit of {name}", say=say, timing=timing)
    say(Progress(f"attention edges of {name}", 0, None))
    attention = attention_edges(model, batches, circuit)
    timing["total_s"] = time.perf_counter() - start
    return CircuitResult(name=name, gated=gated, graph=circuit, curve=curve, refined=refined, level=cfg.faithfulness,
                         top_heads=top_heads(circuit, cfg.top_heads), attention=attention, timing=timing,
                         n_examples=len(pairs), minimized=minimized)


def counting_progress(stage: str, total: int, say: Callable) -> Callable:
    """Announce ``stage`` at 0 of ``total`` steps; returns an ``on_step`` callback that counts one per call."""
    from spartan_cli.evaluate import Progress

    say(Progress(stage, 0, total))
    done = [0]

    def on_step(_record):
        done[0] += 1
        say(Progress(stage, min(done[0], total), total))

    return on_step


def sweep_and_refine(sweep_at: Callable, total_edges: int, cfg: CircuitConfig, *, name: str, n_batches: int,
                     say: Callable, timing: dict, prefix: str = "") -> tuple[Curve, Curve]:
    """Steps 3-4 for either search: the log-grid sweep, then up to ``refine_rounds`` sweeps between the sizes
    that bracket the level. ``sweep_at(sizes, on_step)`` evaluates one list of requested sizes -> Curve
    (``faithfulness.sweep`` or ``token_patching.sweep_tokens`` bound to the model); ``prefix`` starts the
    progress stages ("token "). Times go to ``timing`` (sweep_s, refine_s). Returns (grid curve, refined curve)."""
    from spartan_cli.circuit.faithfulness import log_grid
    from spartan_cli.evaluate import Progress

    def run(sizes, label):
        stage = f"{prefix}{label} of {name} ({len(sizes)} sizes x {n_batches} batches)"

        def on_eval(step):  # step.examples counts the rows before this chunk
            total = n_batches * step.circuits
            say(Progress(stage, min(total, step.examples // cfg.batch_size * step.circuits + step.circuits_done),
                         total))

        return sweep_at(sizes, on_eval)

    t = time.perf_counter()
    curve = run(log_grid(total_edges), "faithfulness sweep")
    timing["sweep_s"] = time.perf_counter() - t
    t = time.perf_counter()
    refined = curve
    for round_ in range(cfg.refine_rounds):
        sizes = refine_sizes(refined, cfg.faithfulness, points=cfg.refine_points)
        if not sizes:
            break
        extra = run(sizes, f"refinement {round_ + 1}")
        refined = Curve(tuple(sorted(refined.points + extra.points, key=lambda p: p.requested)), curve.clean,
                        curve.corrupted, curve.total_edges, curve.selection)
    timing["refine_s"] = time.perf_counter() - t
    return curve, refined


def minimize(model, batches, task, cfg: CircuitConfig, scored, circuit, point: CurvePoint, *, evaluate: Callable,
             prune: Callable, what: str, say: Callable, timing: dict) -> tuple:
    """``--minimize`` for either search: ``faithfulness.eliminate`` of ``circuit`` (selected at the sweep's
    ``point``) with that graph type's ``evaluate`` and ``prune``, progress per pass, timed into ``timing``.
    Returns (circuit, its point)."""
    from spartan_cli.circuit.faithfulness import eliminate
    from spartan_cli.evaluate import Progress

    t = time.perf_counter()
    stage = f"minimizing the {what} (one evaluation per edge)"
    result = eliminate(scored, circuit, point, prune=prune, level=cfg.faithfulness,
                       evaluate_with=lambda circuits: evaluate(model, batches, metric=task.metric, graph=scored,
                                                               circuits=circuits, max_delta_mb=cfg.max_delta_mb),
                       on_step=lambda n, tried, edges: say(Progress(f"{stage}, pass {n}", tried, edges)))
    timing["minimize_s"] = time.perf_counter() - t
    return result


def circuit_run(cfg: CircuitConfig, *, on_progress: Callable | None = None) -> CircuitRun:
    """Load ``cfg.model``, find its circuit, and with ``compare_base`` its base model's (see module docstring)."""
    import gc
    from dataclasses import replace

    from spartan_cli.evaluate import Progress, base_model_name, load_base, load_subject
    from spartan_cli.tasks import default_task, get_task
    from spartan_cli.train import resolve_device

    say = on_progress or (lambda p: log.info(p.stage))
    task = get_task(cfg.task) if cfg.task is not None else None  # unknown names fail before any loading
    device = resolve_device(cfg.device)
    say(Progress(f"loading {cfg.model}", 0, None))
    subject = load_subject(cfg.model, device=device, trust_remote_code=cfg.trust_remote_code)
    task = task or default_task(subject.builtin)
    if task is None:
        raise ConfigError(f"{cfg.model!r} has no task of its own; pass --task (one of the registered tasks, "
                          "e.g. ioi, greater-than, addition, custom:FILE.jsonl)")
    if cfg.level == "token":
        from spartan_cli.circuit.token_discovery import check_layout

        check_layout(task)  # before any attribution
    base_name = base_model_name(subject, cfg.baseline) if cfg.compare_base else None
    if cfg.compare_base and base_name is None:
        raise ConfigError(f"{cfg.model!r} is a plain model with no base model to compare with; pass --baseline "
                          "MODEL or drop --compare-base")
    result = find_circuit(subject.model, subject.tokenizer, cfg, task=task, name=cfg.model, on_progress=on_progress)
    base = None
    if base_name is not None:
        subject = replace(subject, model=None)
        gc.collect()  # one model in memory at a time
        say(Progress(f"loading base model {base_name}", 0, None))
        base_model, _ = load_base(base_name, subject, device=device, trust_remote_code=cfg.trust_remote_code)
        base = find_circuit(base_model, subject.tokenizer, cfg, task=task, name=base_name, on_progress=on_progress)
    resolved = {**cfg.to_dict(), "task": task.spec, "baseline": base_name, "device": str(device)}
    return CircuitRun(model=result, base=base, config=resolved, task=task.describe())


__all__ = ["CircuitConfig", "CircuitResult", "CircuitRun", "AttentionEdges", "NodeScore", "METHOD_NAMES",
           "attention_edges", "circuit_run", "counting_progress", "find_circuit", "minimize", "node_scores", "refine_sizes",
           "sweep_and_refine", "top_heads"]
