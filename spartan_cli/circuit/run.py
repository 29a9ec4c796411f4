"""``spartan circuit`` end to end, at either level: load, search, compare with the base, write, read back.

``circuit_run(cfg)`` loads the model (a spartan checkpoint or any model ``load_model`` takes), runs
``find_circuit`` on it and, with ``compare_base``, frees it, loads the checkpoint's base model and does
the same on identical pairs, one model in memory at a time. ``find_circuit`` runs ``driver.search`` with
the level ``cfg.level`` names (``discovery.COMPONENT`` or ``token_discovery.TOKEN``). The file functions
take a result or graph of either level: ``write_all`` / ``read_circuit`` (circuit.json and the rest,
``files``), ``circuit_dot_text``, ``circuit_graphml_text``, ``circuit_networkx``.
This is the one module that knows both levels; neither level imports the other.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spartan_cli.circuit import export, token_export
from spartan_cli.circuit.discovery import COMPONENT, CircuitResult
from spartan_cli.circuit.driver import CircuitConfig, Level
from spartan_cli.circuit.graph import SCHEMA_VERSION as CIRCUIT_SCHEMA_VERSION
from spartan_cli.circuit.token_discovery import TOKEN, TokenCircuitResult
from spartan_cli.circuit.tokens import TokenGraph, token_networkx
from spartan_cli.errors import ConfigError, DataError

log = logging.getLogger(__name__)

LEVELS: dict[str, Level] = {"component": COMPONENT, "token": TOKEN}
RESULTS = {"circuit_graph": CircuitResult, "token_circuit": TokenCircuitResult}  # circuit.json kind -> reader


def find_circuit(model, tokenizer, cfg: CircuitConfig, *, task=None, name: str | None = None,
                 on_progress: Callable | None = None) -> CircuitResult | TokenCircuitResult:
    """The circuit of one model at ``cfg.level``. ``task``: a Task (default: ``get_task(cfg.task)``);
    ``on_progress`` takes progress.Progress records."""
    from spartan_cli.circuit.driver import search
    from spartan_cli.tasks import get_task

    if task is None:
        if cfg.task is None:
            raise ConfigError("no task to find a circuit for; pass --task (e.g. ioi, greater-than, addition)")
        task = get_task(cfg.task)
    return search(model, tokenizer, cfg, task=task, level=LEVELS[cfg.level], name=name, on_progress=on_progress)


@dataclass(frozen=True)
class CircuitRun:
    """What ``circuit_run`` did: the model's circuit, the base model's (or None) and the resolved settings."""

    model: CircuitResult | TokenCircuitResult
    base: CircuitResult | TokenCircuitResult | None
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


def _ratio(base, model, what: str) -> float | None:
    if base is None or model.needed is None or base.needed is None:
        return None
    top, bottom = getattr(base.needed, what), getattr(model.needed, what)
    return top / bottom if bottom else math.inf


def circuit_run(cfg: CircuitConfig, *, on_progress: Callable | None = None) -> CircuitRun:
    """Load ``cfg.model``, find its circuit, and with ``compare_base`` its base model's (see module docstring)."""
    from spartan_cli.hf.subjects import base_model_name, load_subject_and_task, swap_for_base

    say = on_progress or (lambda p: log.info(p.stage))
    subject, task, device = load_subject_and_task(cfg, say)
    if task is None:
        raise ConfigError(f"{cfg.model!r} has no task of its own; pass --task (one of the registered tasks, "
                          "e.g. ioi, greater-than, addition, custom:FILE.jsonl)")
    LEVELS[cfg.level].check(cfg, task)  # before any loading of the base or attribution
    base_name = base_model_name(subject, cfg.baseline) if cfg.compare_base else None
    if cfg.compare_base and base_name is None:
        raise ConfigError(f"{cfg.model!r} is a plain model with no base model to compare with; pass --baseline "
                          "MODEL or drop --compare-base")
    result = find_circuit(subject.model, subject.tokenizer, cfg, task=task, name=cfg.model, on_progress=on_progress)
    base = None
    if base_name is not None:
        subject, base_model = swap_for_base(subject, base_name, device=device,
                                            trust_remote_code=cfg.trust_remote_code, say=say)
        base = find_circuit(base_model, subject.tokenizer, cfg, task=task, name=base_name, on_progress=on_progress)
    resolved = {**cfg.to_dict(), "task": task.spec, "baseline": base_name, "device": str(device)}
    return CircuitRun(model=result, base=base, config=resolved, task=task.describe())


# ---------------------------------------------------------------------- a circuit from a file, evaluated
def read_graph_file(path):
    """A component circuit from a JSON file: EAP-IG / MIB graph JSON (cfg, nodes, edges) or a circuit.json
    of ``spartan circuit`` (component level) -> graph.Graph with its ``in_graph``."""
    from spartan_cli.circuit.graph import Graph

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"circuit file {str(path)!r} does not exist; pass an EAP-IG graph JSON or a circuit.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not JSON ({getattr(exc, 'msg', exc)}); pass an EAP-IG graph JSON or a "
                        "circuit.json") from None
    if not isinstance(data, dict) or data.get("kind") == "token_circuit":
        raise DataError(f"{path} is not a component circuit (EAP-IG graph JSON: cfg, nodes, edges); token-level "
                        "circuits cannot be evaluated this way")
    return Graph.from_dict({k: data[k] for k in ("cfg", "edges", "schema_version") if k in data})


def evaluate_graph(model, tokenizer, circuit, cfg: CircuitConfig, *, task, name: str,
                   say: Callable | None = None) -> dict:
    """Edge-patching faithfulness of ``circuit`` (a graph.Graph) on ``model`` for ``task``: the same pairs,
    metric and deterministic gates as a search; refuses a circuit of another architecture's shape."""
    import torch

    from spartan_cli.circuit.driver import batches_of
    from spartan_cli.circuit.faithfulness import evaluate
    from spartan_cli.circuit.graph import Graph
    from spartan_cli.gating.attention import is_gated
    from spartan_cli.gating.scopes import deterministic_gates

    graph = Graph.from_model(model)
    theirs = (circuit.n_layers, circuit.n_heads, circuit.parallel_attn_mlp)
    ours = (graph.n_layers, graph.n_heads, graph.parallel_attn_mlp)
    if theirs != ours:
        raise ConfigError(f"the circuit is of a model with {theirs[0]} layers x {theirs[1]} heads (parallel "
                          f"attention/MLP {theirs[2]}), {name} has {ours[0]} x {ours[1]} ({ours[2]}): evaluate it "
                          "on a model of its architecture")
    pairs = task.contrast(tokenizer, n=cfg.n_examples, seed=cfg.seed)
    batches = batches_of(pairs, cfg.batch_size)
    gated = is_gated(model)
    from spartan_cli.progress import Progress

    stage = f"evaluating the circuit on {name} (edge patching)"
    say = say or (lambda p: None)
    say(Progress(stage, 0, len(pairs)))
    with deterministic_gates(model) if gated else nullcontext(), torch.no_grad():
        result = evaluate(model, batches, metric=task.metric, circuits=[circuit.in_graph], graph=graph,
                          max_delta_mb=cfg.max_delta_mb,
                          on_step=lambda step: say(Progress(stage, min(len(pairs), step.examples), len(pairs))))
    say(Progress(stage, len(pairs), len(pairs)))
    metric = result.metrics[0]
    return {"model": name, "gated": gated, "edges": circuit.n_edges, "nodes": circuit.n_nodes,
            "total_edges": graph.n_real_edges, "metric": metric, "faithfulness": result.faithfulness(metric),
            "baselines": {"clean": result.clean, "corrupted": result.corrupted}, "n_examples": result.n_examples}


def evaluate_circuit_run(cfg: CircuitConfig, path, *, on_progress: Callable | None = None) -> dict:
    """``spartan circuit MODEL --evaluate-circuit FILE``: the file's circuit on ``cfg.model`` (and with
    ``compare_base`` on its base model too) -> {"task", "circuit", "model", "base"}."""
    from spartan_cli.hf.subjects import base_model_name, load_subject_and_task, swap_for_base

    if cfg.level != "component" or cfg.minimize:
        raise ConfigError("--evaluate-circuit reads a component circuit and evaluates it as it is; drop --level "
                          "token and --minimize")
    say = on_progress or (lambda p: log.info(p.stage))
    circuit = read_graph_file(path)  # before any loading
    subject, task, device = load_subject_and_task(cfg, say)
    if task is None:
        raise ConfigError(f"{cfg.model!r} has no task of its own; pass --task")
    base_name = base_model_name(subject, cfg.baseline) if cfg.compare_base else None
    if cfg.compare_base and base_name is None:
        raise ConfigError(f"{cfg.model!r} is a plain model with no base model to compare with; pass --baseline "
                          "MODEL or drop --compare-base")
    model = evaluate_graph(subject.model, subject.tokenizer, circuit, cfg, task=task, name=cfg.model, say=say)
    base = None
    if base_name is not None:
        subject, base_model = swap_for_base(subject, base_name, device=device,
                                            trust_remote_code=cfg.trust_remote_code, say=say)
        base = evaluate_graph(base_model, subject.tokenizer, circuit, cfg, task=task, name=base_name, say=say)
    return {"task": task.describe(), "circuit": str(path), "model": model, "base": base}


# ------------------------------------------------------------------------------------------- files
def write_all(result, out_dir, *, command: str = "", config: dict | None = None) -> list[Path]:
    """circuit.json, circuit.graphml, circuit.dot, curve.csv, curve.png, circuit.png in ``out_dir``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {str(out)!r} exists and is not a directory; pass a directory")
    write = token_export.write_token_files if isinstance(result, TokenCircuitResult) else export.write_component_files
    return write(result, out, command=command, config=config)


def read_circuit(path) -> CircuitResult | TokenCircuitResult:
    """circuit.json -> discovery.CircuitResult (graph with the circuit, curves, summary); a token-level file
    (kind "token_circuit") -> token_discovery.TokenCircuitResult."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"circuit file {str(path)!r} does not exist; pass the circuit.json `spartan circuit --out` "
                        "wrote") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if data.get("schema_version") != CIRCUIT_SCHEMA_VERSION:
        raise DataError(f"{path} has schema_version {data.get('schema_version')!r}; this spartan reads "
                        f"{CIRCUIT_SCHEMA_VERSION}: re-run `spartan circuit`")
    try:
        return RESULTS.get(data.get("kind"), CircuitResult).from_dict(data)
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path} lacks {exc}; it was not written by `spartan circuit`") from None


def circuit_networkx(graph):
    """The circuit of a component Graph or a TokenGraph as a networkx DiGraph."""
    return token_networkx(graph) if isinstance(graph, TokenGraph) else export.to_networkx_circuit(graph)


def circuit_graphml_text(graph) -> str:
    return (token_export.token_graphml_text if isinstance(graph, TokenGraph) else export.graphml_text)(graph)


def circuit_dot_text(graph, *, title: str = "circuit") -> str:
    return (token_export.token_dot_text if isinstance(graph, TokenGraph) else export.dot_text)(graph, title=title)


__all__ = ["LEVELS", "CircuitRun", "circuit_dot_text", "circuit_graphml_text", "circuit_networkx", "circuit_run",
           "evaluate_circuit_run", "evaluate_graph", "find_circuit", "read_circuit", "read_graph_file", "write_all"]
