"""The circuit search both levels run: attribute -> sweep -> refine -> minimize (docs/circuits.md).

``search(model, tokenizer, cfg, task=..., level=...)``, for one model:
1. Build the task's minimal pairs for the tokenizer (``Task.contrast``: clean/corrupted prompts of one
   length, right-padded, and the answers its metric reads) and cut them into batches of ``batch_size``.
2. Score every edge with the level's attribution. A gated model runs with deterministic gates, 1[g > 0],
   in attribution and in patching; under patching the gates are recomputed from the patched q/k (a
   corrupted key may open or shut a gate), and no gradient crosses the threshold.
3. Sweep circuit sizes over auto-circuit's log grid (1-9, 10-90, 100-900, ..., all edges), selecting
   (greedy or top-n, then pruned) and evaluating each by edge patching -> normalized faithfulness F
   against post-prune edges. CPR/CMD are areas over this grid, so any two models of one architecture are
   compared on the same fractions.
4. Refine: the running maximum of F first reaches ``faithfulness`` between two grid sizes; sweep
   ``refine_points`` evenly spaced sizes between them, ``refine_rounds`` times, so the edges needed are
   exact (or within a few percent on large graphs) instead of the grid's next decade. Not interpolated.
5. The circuit is the selection at the smallest size whose running-max F reaches the level, or, if none
   does, at the size with the best F. With ``minimize`` a circuit that reaches the level is then cut by
   backward elimination (``curve.eliminate``: no single edge can leave it and keep F >= the level), and
   its edges are the ones reported as needed.
6. The level finishes its own result (``Level.finish``): the component level adds the heads ranked by
   summed |score| and the attention pairs its heads read; the token level reads paths per position.

A ``Level`` is what one graph type brings: its attribution, sweep, selection, evaluation and pruning.
``discovery.COMPONENT`` and ``token_discovery.TOKEN`` are the two; ``run`` picks one per ``cfg.level``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from spartan_cli.circuit.curve import Curve, CurvePoint, SweepChoice, refine_sizes
from spartan_cli.errors import ConfigError

METHOD_NAMES = {"eap": "eap", "eap-ig": "eap-ig-inputs", "exact": "exact"}


LEVELS = ("component", "token")  # graph granularity: discovery.COMPONENT or token_discovery.TOKEN


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
    minimize: bool = False  # backward elimination of the circuit that reaches the level (curve.eliminate)

    def __post_init__(self):
        from spartan_cli.circuit.attribute import METHODS
        from spartan_cli.circuit.taps import GATE_GRADIENTS
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


def curve_rows(result: SweepChoice) -> list[dict]:
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


def clean_forward_s(model, batch) -> float:
    """Seconds of one plain clean forward of ``batch`` (no grad, eval mode): the unit attribution costs are read in."""
    import time

    import torch

    from spartan_cli.gating.scopes import evaluating

    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model):
        t = time.perf_counter()
        model(input_ids=batch.clean.to(device),
              attention_mask=None if batch.attention_mask is None else batch.attention_mask.to(device))
        return time.perf_counter() - t


def counting_progress(stage: str, total: int, say: Callable) -> Callable:
    """Announce ``stage`` at 0 of ``total`` steps; returns an ``on_step`` callback that counts one per call."""
    from spartan_cli.progress import Progress

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
    from spartan_cli.circuit.curve import log_grid
    from spartan_cli.progress import Progress

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
    """``--minimize`` for either search: ``curve.eliminate`` of ``circuit`` (selected at the sweep's
    ``point``) with that graph type's ``evaluate`` and ``prune``, progress per pass, timed into ``timing``.
    Returns (circuit, its point)."""
    from spartan_cli.circuit.curve import eliminate
    from spartan_cli.progress import Progress

    t = time.perf_counter()
    stage = f"minimizing the {what} (one evaluation per edge)"
    result = eliminate(scored, circuit, point, prune=prune, level=cfg.faithfulness,
                       evaluate_with=lambda circuits: evaluate(model, batches, metric=task.metric, graph=scored,
                                                               circuits=circuits, max_delta_mb=cfg.max_delta_mb),
                       on_step=lambda n, tried, edges: say(Progress(f"{stage}, pass {n}", tried, edges)))
    timing["minimize_s"] = time.perf_counter() - t
    return result

@runtime_checkable
class CircuitGraph(Protocol):
    """What the search and the files read of a graph, at either level: ``graph.Graph`` (components; scores
    and membership as (n_forward, n_backward) tensors) and ``tokens.TokenGraph`` (components at positions
    and attention pairs; a flat edge list) both implement it."""

    scores: Any  # per edge, signed: m(edge patched) - m(clean)
    in_graph: Any  # bool, same shape: the circuit
    meta: dict  # model, task, method, ... (JSON-able)

    @property
    def real(self) -> Any: ...  # bool, same shape: which entries are edges

    @property
    def n_real_edges(self) -> int: ...

    @property
    def n_edges(self) -> int: ...  # edges in the circuit

    @property
    def n_nodes(self) -> int: ...  # nodes on the circuit's paths

    def edges(self, *args, **kwargs) -> list: ...  # read-only views, named like EAP-IG's

    def edge_index(self, *names: str) -> Any: ...  # by EAP-IG name (component) or (src, dst) (token)

    def with_circuit(self, in_graph) -> CircuitGraph: ...

    def with_scores(self, scores, **meta) -> CircuitGraph: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class Level:
    """One graph type's part in ``search``. Graphs of the level share one protocol: ``scores``, ``in_graph``,
    ``real``/``n_real_edges``, ``n_edges``, ``n_nodes``, ``with_circuit``, ``meta`` and ``to_dict``."""

    name: str  # "component" | "token"
    prefix: str  # what progress stages start with ("" or "token ")
    # (model, batches, *, cfg, metric, meta, gated, on_step) -> the scored graph, every edge in the circuit
    attribute: Callable[..., Any]
    # (model, batches, *, metric, graph, sizes, selection, max_delta_mb, on_step) -> Curve
    sweep: Callable[..., Curve]
    select: Callable[[Any, int, str], Any]  # (scored, requested size, selection) -> the circuit
    evaluate: Callable[..., Any]  # (model, batches, *, metric, graph, circuits, max_delta_mb) -> Evaluation
    prune: Callable[[Any, Any], Any]  # (graph, in_graph) -> in_graph
    finish: Callable[..., Any]  # (model, batches, found: Found, cfg, say) -> the level's result
    check: Callable[[Any, Any], None] = lambda cfg, task: None  # refuses a task or method before any work


@dataclass(frozen=True)
class Found(SweepChoice):
    """What ``search`` found, before its level adds its own reading."""

    name: str
    gated: bool
    graph: Any  # every edge's score; ``in_graph`` = the chosen circuit
    curve: Curve  # the log-grid sweep
    refined: Curve  # grid + refinement sizes
    level: float  # the faithfulness asked for
    timing: dict
    n_examples: int
    minimized: CurvePoint | None = None


@dataclass(frozen=True)
class _Choice(SweepChoice):
    refined: Curve
    level: float
    minimized: CurvePoint | None = None


def search(model, tokenizer, cfg: CircuitConfig, *, task, level: Level, name: str | None = None,
           on_progress: Callable | None = None):
    """Steps 1-6 of the module docstring for one model -> the level's result. ``on_progress`` takes
    progress.Progress records."""
    from spartan_cli.gating.attention import is_gated
    from spartan_cli.gating.scopes import deterministic_gates

    level.check(cfg, task)
    name = name or cfg.model
    say = on_progress or (lambda p: None)
    start = time.perf_counter()
    pairs = task.contrast(tokenizer, n=cfg.n_examples, seed=cfg.seed)  # ContrastBatch (n, pos)
    batches = batches_of(pairs, cfg.batch_size)
    gated = is_gated(model)
    meta = {"model": name, "task": task.spec, "metric": task.metric_name, "seed": cfg.seed,
            "n_examples": len(pairs), "selection": cfg.selection, "corruption": task.describe().get("corruption"),
            "bos": task.describe().get("bos")}
    timing: dict[str, float] = {"clean_forward_s": clean_forward_s(model, batches[0])}
    n_batches = len(batches)
    with deterministic_gates(model) if gated else nullcontext():
        t = time.perf_counter()
        on_attr = counting_progress(f"{level.prefix}attribution ({cfg.method}) of {name}", n_batches, say)
        scored = level.attribute(model, batches, cfg=cfg, metric=task.metric, meta=meta, gated=gated, on_step=on_attr)
        timing["attribution_s"] = time.perf_counter() - t
        curve, refined = sweep_and_refine(
            lambda sizes, on_step: level.sweep(model, batches, metric=task.metric, graph=scored, sizes=sizes,
                                               selection=cfg.selection, max_delta_mb=cfg.max_delta_mb,
                                               on_step=on_step),
            scored.n_real_edges, cfg, name=name, n_batches=n_batches, say=say, timing=timing, prefix=level.prefix)
        chosen = _Choice(refined, cfg.faithfulness)
        circuit = level.select(scored, chosen.chosen.requested, cfg.selection)
        assert circuit.n_edges == chosen.chosen.edges, (circuit.n_edges, chosen.chosen)
        minimized = None
        if cfg.minimize and chosen.point is not None:
            circuit, minimized = minimize(model, batches, task, cfg, scored, circuit, chosen.point,
                                          evaluate=level.evaluate, prune=level.prune,
                                          what=f"{level.prefix}circuit of {name}", say=say, timing=timing)
    found = Found(name, gated, circuit, curve, refined, cfg.faithfulness, timing, len(pairs), minimized)
    result = level.finish(model, batches, found, cfg, say)
    timing["total_s"] = time.perf_counter() - start  # the result holds this same dict
    return result


__all__ = ["LEVELS", "METHOD_NAMES", "CircuitConfig", "Found", "Level", "batches_of", "clean_forward_s",
           "counting_progress", "curve_rows", "minimize", "minimized_point", "search", "sweep_and_refine",
           "sweep_summary"]
