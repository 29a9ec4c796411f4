"""The component graph of a decoder-only transformer (docs/circuits.md, "The component graph"), as dense tensors with small views.

Sources ("forward" index; the order of the activation-difference buffer):
  ``input`` = 0, then per layer l: ``a{l}.h{h}`` = 1 + l(H+1) + h, then ``m{l}`` = 1 + l(H+1) + H.
Destination slots ("backward" index):
  per layer l: ``a{l}.h{h}<q>`` for every h, then ``<k>``, then ``<v>``, then ``m{l}``; ``logits`` last.
An edge u -> v exists when u writes to the residual stream before v reads it: heads of layer l read the
input and every head and MLP of layers < l; MLP l reads those and, unless attention and MLP run in
parallel (GPT-NeoX, GPT-J), the heads of layer l; the logits read every source. Names follow EAP-IG
(``input->a0.h1<q>``, ``a5.h5->a7.h3<k>``, ``m3->m7``, ``a9.h9->logits``), so circuits can be compared
with published graphs.

``Graph`` holds ``scores`` and ``in_graph`` as (n_forward, n_backward) tensors; ``Node``/``Edge`` are
read-only views for reporting. Selection (``select``) and evaluation (``faithfulness``) work on the tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from spartan_cli.errors import DataError

SCHEMA_VERSION = 1
QKV = ("q", "k", "v")


def edge_count(n_layers: int, n_heads: int, *, parallel_attn_mlp: bool = False) -> int:
    """Number of edges by the closed formula (docs/circuits.md, "The component graph"); 32,491 for GPT-2 small."""
    H = n_heads
    total = 1 + n_layers * (H + 1)  # edges into the logits: one from every source
    for layer in range(n_layers):
        upstream = 1 + layer * (H + 1)
        total += 3 * H * upstream + upstream + (0 if parallel_attn_mlp else H)
    return total


@dataclass(frozen=True)
class Node:
    """A component: ``input``, a head ``a{l}.h{h}``, an MLP ``m{l}``, or ``logits``."""

    name: str
    kind: str  # "input" | "attn" | "mlp" | "logits"
    layer: int | None
    head: int | None
    in_graph: bool


@dataclass(frozen=True)
class Edge:
    """One edge; ``qkv`` is the head input it feeds ("q"/"k"/"v"), None for MLP and logits inputs."""

    parent: str
    child: str
    qkv: str | None
    score: float
    in_graph: bool

    @property
    def name(self) -> str:
        return f"{self.parent}->{self.child}" + (f"<{self.qkv}>" if self.qkv else "")


@dataclass(frozen=True, eq=False)
class Graph:
    """Scores and circuit membership of every edge of one architecture's component graph."""

    n_layers: int
    n_heads: int
    parallel_attn_mlp: bool
    scores: torch.Tensor  # (n_forward, n_backward) float32, 0 where there is no edge
    in_graph: torch.Tensor  # (n_forward, n_backward) bool, False where there is no edge
    meta: dict[str, Any] = field(default_factory=dict)  # model, task, method, ig_steps, ... (JSON-able)

    def __post_init__(self):
        want = (self.n_forward, self.n_backward)
        for name in ("scores", "in_graph"):
            got = tuple(getattr(self, name).shape)
            assert got == want, f"{name} has shape {got}, expected {want}"
        assert not (self.in_graph & ~self.real).any(), "in_graph marks a pair that is not an edge"

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_shape(cls, n_layers: int, n_heads: int, *, parallel_attn_mlp: bool = False, meta=None) -> Graph:
        """Every edge in the circuit, scores zero."""
        n_forward, n_backward = 1 + n_layers * (n_heads + 1), n_layers * (3 * n_heads + 1) + 1
        empty = cls(n_layers, n_heads, parallel_attn_mlp, torch.zeros(n_forward, n_backward),
                    torch.zeros(n_forward, n_backward, dtype=torch.bool), dict(meta or {}))
        return empty.with_circuit(empty.real.clone())

    @classmethod
    def from_model(cls, model, *, meta=None) -> Graph:
        """The graph of a Hugging Face model's architecture (reads only its config)."""
        return cls.from_config(model.config, meta=meta)

    @classmethod
    def from_config(cls, config, *, meta=None) -> Graph:
        """The graph of a Hugging Face config's architecture; no weights are built."""
        from types import SimpleNamespace

        from spartan_cli.circuit.anatomy import parallel_attn_mlp
        from spartan_cli.hf.models import model_shape

        config_only = SimpleNamespace(config=config)  # the shape helpers read nothing but ``.config``
        shape = model_shape(config_only)
        meta = {"d_model": shape.d_model, **(meta or {})}  # EAP-IG's Graph.from_json needs d_model in cfg
        return cls.from_shape(shape.n_layers, shape.n_heads, parallel_attn_mlp=parallel_attn_mlp(config_only),
                              meta=meta)

    def with_circuit(self, in_graph: torch.Tensor) -> Graph:
        """The same graph and scores with another circuit (non-edges are cleared)."""
        return dataclasses.replace(self, in_graph=in_graph.to(torch.bool) & self.real)

    def with_scores(self, scores: torch.Tensor, **meta) -> Graph:
        return dataclasses.replace(self, scores=scores.float() * self.real, meta={**self.meta, **meta})

    # -- index arithmetic ---------------------------------------------------------------------------------
    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def head_source(self, layer: int, head: int = 0) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def head_slot(self, layer: int, head: int = 0, qkv: str = "q") -> int:
        return layer * (3 * self.n_heads + 1) + QKV.index(qkv) * self.n_heads + head

    def mlp_slot(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_slot(self) -> int:
        return self.n_backward - 1

    @cached_property
    def n_upstream(self) -> torch.Tensor:
        """(n_backward,) int64: sources [0, n_upstream[b]) are the parents of slot b."""
        up = torch.empty(self.n_backward, dtype=torch.long)
        for layer in range(self.n_layers):
            up[self.head_slot(layer):self.mlp_slot(layer)] = self.head_source(layer)
            up[self.mlp_slot(layer)] = self.head_source(layer) + (0 if self.parallel_attn_mlp else self.n_heads)
        up[self.logits_slot] = self.n_forward
        return up

    @cached_property
    def real(self) -> torch.Tensor:
        """(n_forward, n_backward) bool: which (source, slot) pairs are edges."""
        return torch.arange(self.n_forward)[:, None] < self.n_upstream[None, :]

    @cached_property
    def slot_owner(self) -> torch.Tensor:
        """(n_backward,) int64: the source index of the node each slot belongs to; -1 for the logits."""
        owner = torch.full((self.n_backward,), -1, dtype=torch.long)
        for layer in range(self.n_layers):
            for i, qkv in enumerate(QKV):
                start = self.head_slot(layer, 0, qkv)
                owner[start:start + self.n_heads] = torch.arange(self.n_heads) + self.head_source(layer)
            owner[self.mlp_slot(layer)] = self.mlp_source(layer)
        return owner

    # -- names --------------------------------------------------------------------------------------------
    @cached_property
    def source_names(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return names

    @cached_property
    def slot_names(self) -> list[str]:
        """Destination names, with the head input as a suffix: ``a3.h1<k>``."""
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<{qkv}>" for qkv in QKV for h in range(self.n_heads)] + [f"m{layer}"]
        return names + ["logits"]

    def edge_name(self, source: int, slot: int) -> str:
        return f"{self.source_names[source]}->{self.slot_names[slot]}"

    def edge_index(self, name: str) -> tuple[int, int]:
        """(source, slot) of an edge named like ``a0.h1->a1.h3<k>``; DataError if there is no such edge."""
        parent, _, child = name.partition("->")
        try:
            f, b = self._source_lookup[parent], self._slot_lookup[child]
        except KeyError:
            raise DataError(f"{name!r} is not an edge of this graph ({self.n_layers} layers, {self.n_heads} heads); "
                            f"edges look like 'input->a0.h1<q>', 'a0.h2->m1', 'm1->logits'") from None
        if not self.real[f, b]:
            raise DataError(f"{name!r} is not an edge: {parent} does not write before {child} reads")
        return f, b

    @cached_property
    def _source_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.source_names)}

    @cached_property
    def _slot_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.slot_names)}

    # -- views --------------------------------------------------------------------------------------------
    @property
    def n_real_edges(self) -> int:
        return int(self.real.sum())

    @property
    def n_edges(self) -> int:
        """Edges in the circuit."""
        return int(self.in_graph.sum())

    @property
    def source_in_graph(self) -> torch.Tensor:
        """(n_forward,) bool: sources with at least one circuit edge out of them."""
        return self.in_graph.any(dim=1)

    @property
    def n_nodes(self) -> int:
        """Nodes in the circuit (sources with an outgoing circuit edge, plus the logits if any edge reaches them)."""
        return int(self.source_in_graph.sum()) + int(self.in_graph[:, self.logits_slot].any())

    def nodes(self) -> list[Node]:
        inside = self.source_in_graph.tolist()
        out = [Node("input", "input", None, None, inside[0])]
        for layer in range(self.n_layers):
            out += [Node(f"a{layer}.h{h}", "attn", layer, h, inside[self.head_source(layer, h)])
                    for h in range(self.n_heads)]
            out.append(Node(f"m{layer}", "mlp", layer, None, inside[self.mlp_source(layer)]))
        out.append(Node("logits", "logits", None, None, bool(self.in_graph[:, self.logits_slot].any())))
        return out

    def edges(self, *, in_graph_only: bool = False) -> list[Edge]:
        """Edges in (source, slot) order; with ``in_graph_only`` the circuit's edges only."""
        mask = self.in_graph if in_graph_only else self.real
        fs, bs = torch.nonzero(mask, as_tuple=True)
        scores, inside = self.scores[fs, bs].tolist(), self.in_graph[fs, bs].tolist()
        return [self._edge(f, b, s, i) for f, b, s, i in zip(fs.tolist(), bs.tolist(), scores, inside)]

    def edge(self, name: str) -> Edge:
        f, b = self.edge_index(name)
        return self._edge(f, b, float(self.scores[f, b]), bool(self.in_graph[f, b]))

    def _edge(self, f: int, b: int, score: float, inside: bool) -> Edge:
        child = self.slot_names[b]
        qkv = None
        if child.endswith(">"):
            child, qkv = child[:-3], child[-2]
        return Edge(self.source_names[f], child, qkv, score, inside)

    def top_edges(self, k: int = 20, *, in_graph_only: bool = True) -> list[Edge]:
        """The k edges with the largest |score| (circuit edges only by default)."""
        mask = self.in_graph if in_graph_only else self.real
        flat = self.scores.abs().masked_fill(~mask, -1.0).flatten()
        k = min(k, int(mask.sum()))
        idx = torch.topk(flat, k).indices.tolist()
        nb = self.n_backward
        return [self._edge(i // nb, i % nb, float(self.scores.flatten()[i]), bool(self.in_graph.flatten()[i]))
                for i in idx]

    # -- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """EAP-IG-compatible JSON object: ``cfg``, ``nodes`` {name: {in_graph}}, ``edges`` {name: {score, in_graph}}."""
        return {
            "schema_version": SCHEMA_VERSION,
            "cfg": {"n_layers": self.n_layers, "n_heads": self.n_heads,
                    "parallel_attn_mlp": self.parallel_attn_mlp, **self.meta},
            "nodes": {n.name: {"in_graph": n.in_graph} for n in self.nodes()},
            "edges": {e.name: {"score": e.score, "in_graph": e.in_graph} for e in self.edges()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Graph:
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise DataError(f"circuit graph schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        try:
            cfg = dict(data["cfg"])
            n_layers, n_heads = int(cfg.pop("n_layers")), int(cfg.pop("n_heads"))
            parallel = bool(cfg.pop("parallel_attn_mlp", False))
            edges = data["edges"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"circuit graph JSON lacks {exc}; it needs cfg.n_layers, cfg.n_heads and edges") from None
        graph = cls.from_shape(n_layers, n_heads, parallel_attn_mlp=parallel, meta=cfg)
        scores = torch.zeros_like(graph.scores)
        in_graph = torch.zeros_like(graph.in_graph)
        for name, rec in edges.items():
            f, b = graph.edge_index(name)
            scores[f, b] = float(rec.get("score", 0.0))
            in_graph[f, b] = bool(rec.get("in_graph", False))
        return dataclasses.replace(graph, scores=scores, in_graph=in_graph)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_eap_ig(self) -> dict:
        """Exactly the fields EAP-IG's (and MIB's) ``Graph.from_json`` reads: ``cfg`` {n_layers, n_heads,
        parallel_attn_mlp, d_model}, ``nodes`` {name: {in_graph}}, ``edges`` {name: {score, in_graph}}."""
        full = self.to_dict()
        cfg = {k: full["cfg"][k] for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model") if k in full["cfg"]}
        return {"cfg": cfg, "nodes": full["nodes"], "edges": full["edges"]}

    @classmethod
    def from_json(cls, text: str) -> Graph:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"circuit graph is not valid JSON: {exc}") from None
        return cls.from_dict(data)



def to_networkx(graph: Graph, *, in_graph_only: bool = True):
    """A networkx DiGraph of components; an edge merges the q/k/v slots it feeds.

    Node attributes: kind, layer, head (-1 where none: GraphML has no null). Edge attributes: qkv (the slots,
    e.g. "qv"; "" for MLP/logits inputs), score (sum over those slots), score_q/score_k/score_v, in_graph.
    """
    import networkx as nx

    g = nx.DiGraph()
    for node in graph.nodes():
        if in_graph_only and not node.in_graph:
            continue
        g.add_node(node.name, kind=node.kind, layer=-1 if node.layer is None else node.layer,
                   head=-1 if node.head is None else node.head, in_graph=node.in_graph)
    for e in graph.edges(in_graph_only=in_graph_only):
        for name in (e.parent, e.child):  # with in_graph_only=False every node is present already
            assert name in g, name
        attrs = g.get_edge_data(e.parent, e.child)
        if attrs is None:
            attrs = {"qkv": "", "score": 0.0, "in_graph": False}
            g.add_edge(e.parent, e.child, **attrs)
            attrs = g.get_edge_data(e.parent, e.child)
        if e.qkv:
            attrs["qkv"] += e.qkv
            attrs[f"score_{e.qkv}"] = e.score
        attrs["score"] += e.score
        attrs["in_graph"] = attrs["in_graph"] or e.in_graph
    return g
