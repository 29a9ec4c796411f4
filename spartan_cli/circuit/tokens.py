"""The token-level graph of a decoder-only transformer (docs/circuits.md, "Token-level graphs"): nodes are components at positions.

Nodes, for prompts of ``n_pos`` positions (one layout shared by every prompt):
  ``input@t``, ``a{l}.h{h}@t`` (head output), ``m{l}@t``, ``logits@t`` at the metric positions only, and per
  head and position the key and value inputs ``a{l}.h{h}:k@t`` / ``a{l}.h{h}:v@t``.
Edges:
  (a) residual, at one position: ``a0.h1@3 -> a2.h0<k>@3`` (into the key input node ``a2.h0:k@3``),
      ``-> a2.h0<q>@3`` (into the head itself: a query reads its own position), ``-> m2@3``, ``-> logits@9``;
      the parents of a slot are those of the component graph (graph.py).
  (b) attention, inside head (l, h): ``a{l}.h{h}:k@j -> a{l}.h{h}@i`` and ``:v@j -> @i`` for key j <= query i,
      only for the (i, j) pairs in ``attn_pairs``: where the deterministic gate is open on the clean run of
      some prompt (gated models), every causal pair (dense models).
Edge order (the index of ``scores``/``in_graph``): residual edges in (source, slot, position) order, then
attention edges in (layer, head, k|v, query, key) order. Node ids: sources (source, position), then key/value
inputs (layer, head, k|v, position), then logits (position).

``prune`` keeps a node only with a circuit edge in (the input needs none) and a circuit edge out (the logits
need none), to a fixed point: every circuit edge then lies on an input -> logits path, and the graph is
acyclic (residual edges climb layers at one position; attention edges go from a layer's key/value inputs
to the same layer's heads, from an earlier position to a later one or the same).
``greedy`` grows from the logits backwards by |score| (one order serves every size: circuits of a sweep
are prefixes of it), ``topn`` takes the best edges anywhere; both are pruned.
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from spartan_cli.circuit.graph import QKV, Graph
from spartan_cli.errors import ConfigError, DataError

TOKEN_SCHEMA_VERSION = 1
KV = ("k", "v")
_NAME = re.compile(r"^(?P<node>[^@<:]+)(?:<(?P<slot>[qkv])>|:(?P<kv>[kv]))?@(?P<pos>\d+)$")


@dataclass(frozen=True)
class TokenEdge:
    """One token edge: ``type`` "residual" or "attn"; ``qkv`` the head input a residual edge feeds."""

    src: str
    dst: str
    type: str
    score: float
    in_graph: bool
    qkv: str | None = None

    def to_dict(self) -> dict:
        return {"src": self.src, "dst": self.dst, "type": self.type, "score": self.score, "in_graph": self.in_graph}


@dataclass(frozen=True, eq=False)
class TokenGraph:
    """Scores and circuit membership of every token edge of one architecture at one prompt layout."""

    component: Graph  # the component graph of the architecture (index arithmetic and names)
    n_pos: int
    metric_positions: tuple[int, ...]  # positions whose logits the metric reads
    attn_pairs: torch.Tensor  # (n_layers, n_heads, pos_q, pos_k) bool: which (query, key) pairs are edges
    scores: torch.Tensor  # (n_edges,) float32
    in_graph: torch.Tensor  # (n_edges,) bool
    gated: bool = False
    open_share: torch.Tensor | None = None  # (n_layers, n_heads, pos_q, pos_k): share of prompts with the gate open
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        T, c = self.n_pos, self.component
        assert tuple(self.attn_pairs.shape) == (c.n_layers, c.n_heads, T, T), self.attn_pairs.shape
        assert not (self.attn_pairs & ~torch.ones(T, T, dtype=torch.bool).tril()).any(), "a key after its query"
        assert all(0 <= p < T for p in self.metric_positions), self.metric_positions
        assert self.scores.shape == self.in_graph.shape == (self.n_edges_total,), (self.scores.shape, self.n_edges_total)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, component: Graph, *, n_pos: int, metric_positions, attn_pairs: torch.Tensor | None = None,
              gated: bool = False, open_share=None, meta=None) -> TokenGraph:
        """Every edge in the circuit, scores zero. ``attn_pairs`` defaults to every causal pair."""
        if attn_pairs is None:
            attn_pairs = torch.ones(n_pos, n_pos, dtype=torch.bool).tril().expand(
                component.n_layers, component.n_heads, n_pos, n_pos).clone()
        metric_positions = tuple(sorted({int(p) for p in metric_positions}))
        n = _count(component, n_pos, metric_positions, attn_pairs)
        return cls(component, n_pos, metric_positions, attn_pairs.bool().cpu(), torch.zeros(n),
                   torch.ones(n, dtype=torch.bool), gated, open_share, dict(meta or {}))

    def with_scores(self, scores: torch.Tensor, **meta) -> TokenGraph:
        return dataclasses.replace(self, scores=scores.float().cpu(), meta={**self.meta, **meta})

    def with_circuit(self, in_graph: torch.Tensor) -> TokenGraph:
        return dataclasses.replace(self, in_graph=in_graph.bool().cpu())

    # -- index arithmetic ---------------------------------------------------------------------------------
    @cached_property
    def residual_real(self) -> torch.Tensor:
        """(n_forward, n_backward, pos) bool: the residual edges (into the logits at metric positions only)."""
        c, T = self.component, self.n_pos
        real = c.real[:, :, None].expand(c.n_forward, c.n_backward, T).clone()
        at_metric = torch.zeros(T, dtype=torch.bool)
        at_metric[list(self.metric_positions)] = True
        real[:, c.logits_slot] &= at_metric
        return real

    @cached_property
    def residual_index(self) -> torch.Tensor:
        """(n_residual, 3) int64: (source, slot, position) of each residual edge, in edge order."""
        return torch.nonzero(self.residual_real)

    @cached_property
    def attn_index(self) -> torch.Tensor:
        """(n_attn, 5) int64: (layer, head, 0=k|1=v, query, key) of each attention edge, in edge order."""
        c = self.component
        pairs = self.attn_pairs[:, :, None].expand(c.n_layers, c.n_heads, 2, self.n_pos, self.n_pos)
        return torch.nonzero(pairs)

    @property
    def n_residual(self) -> int:
        return len(self.residual_index)

    @property
    def n_attn(self) -> int:
        return len(self.attn_index)

    @property
    def n_edges_total(self) -> int:
        return _count(self.component, self.n_pos, self.metric_positions, self.attn_pairs)

    @property
    def n_real_edges(self) -> int:
        return self.n_edges_total

    @property
    def real(self) -> torch.Tensor:
        """(n_edges_total,) bool: every entry of the flat edge list is an edge (the protocol's real-edge mask)."""
        return torch.ones(self.n_edges_total, dtype=torch.bool)

    @property
    def n_edges(self) -> int:
        return int(self.in_graph.sum())

    @property
    def n_nodes_total(self) -> int:
        c, T = self.component, self.n_pos
        return c.n_forward * T + c.n_layers * c.n_heads * 2 * T + T

    def _kv_node(self, layer, head, kv, pos):
        c, T = self.component, self.n_pos
        return c.n_forward * T + ((layer * c.n_heads + head) * 2 + kv) * T + pos

    def _logits_node(self, pos):
        c, T = self.component, self.n_pos
        return c.n_forward * T + c.n_layers * c.n_heads * 2 * T + pos

    @cached_property
    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst) node ids of every edge, each (n_edges,) int64."""
        c, T, H = self.component, self.n_pos, self.component.n_heads
        f, b, t = self.residual_index.unbind(1)
        src = [f * T + t]
        # the node a slot belongs to: q -> the head itself, k/v -> the head's key/value input, MLP, logits
        n_slots = c.n_backward
        slot_layer = torch.zeros(n_slots, dtype=torch.long)
        slot_kind = torch.full((n_slots,), -1, dtype=torch.long)  # 0 q, 1 k, 2 v, 3 mlp, 4 logits
        slot_head = torch.zeros(n_slots, dtype=torch.long)
        for layer in range(c.n_layers):
            for i, qkv in enumerate(QKV):
                start = c.head_slot(layer, 0, qkv)
                slot_layer[start:start + H], slot_kind[start:start + H] = layer, i
                slot_head[start:start + H] = torch.arange(H)
            slot_layer[c.mlp_slot(layer)], slot_kind[c.mlp_slot(layer)] = layer, 3
        slot_kind[c.logits_slot] = 4
        kind, layer, head = slot_kind[b], slot_layer[b], slot_head[b]
        owner = c.slot_owner[b].clamp(min=0)
        dst = torch.where(kind == 0, owner * T + t, 0)  # q
        dst = torch.where(kind == 3, owner * T + t, dst)  # MLP
        dst = torch.where((kind == 1) | (kind == 2), self._kv_node(layer, head, (kind - 1).clamp(min=0), t), dst)
        dst = torch.where(kind == 4, self._logits_node(t), dst)
        dsts = [dst]
        if self.n_attn:
            l, h, kv, i, j = self.attn_index.unbind(1)
            src.append(self._kv_node(l, h, kv, j))
            dsts.append((1 + l * (H + 1) + h) * T + i)
        return torch.cat(src), torch.cat(dsts)

    @cached_property
    def node_kind(self) -> torch.Tensor:
        """(n_nodes,) int64: 0 input, 1 head, 2 MLP, 3 key/value input, 4 logits."""
        c, T = self.component, self.n_pos
        kind = torch.full((self.n_nodes_total,), 3, dtype=torch.long)
        src_kind = torch.ones(c.n_forward, dtype=torch.long)
        src_kind[0] = 0
        src_kind[[c.mlp_source(layer) for layer in range(c.n_layers)]] = 2
        kind[:c.n_forward * T] = src_kind.repeat_interleave(T)
        kind[self._logits_node(0):] = 4
        return kind

    # -- names --------------------------------------------------------------------------------------------
    def node_name(self, node: int) -> str:
        c, T = self.component, self.n_pos
        if node < c.n_forward * T:
            return f"{c.source_names[node // T]}@{node % T}"
        if node >= self._logits_node(0):
            return f"logits@{node - self._logits_node(0)}"
        rest, pos = divmod(node - c.n_forward * T, T)
        rest, kv = divmod(rest, 2)
        layer, head = divmod(rest, c.n_heads)
        return f"a{layer}.h{head}:{KV[kv]}@{pos}"

    def edge(self, e: int) -> TokenEdge:
        """The view of edge ``e`` (an index into ``scores``)."""
        c = self.component
        score, inside = float(self.scores[e]), bool(self.in_graph[e])
        if e < self.n_residual:
            f, b, t = self.residual_index[e].tolist()
            slot = c.slot_names[b]
            qkv = slot[-2] if slot.endswith(">") else None
            return TokenEdge(f"{c.source_names[f]}@{t}", f"{slot}@{t}", "residual", score, inside, qkv)
        layer, head, kv, i, j = self.attn_index[e - self.n_residual].tolist()
        return TokenEdge(f"a{layer}.h{head}:{KV[kv]}@{j}", f"a{layer}.h{head}@{i}", "attn", score, inside, KV[kv])

    def edges(self, *, in_graph_only: bool = False, order: str = "index") -> list[TokenEdge]:
        """Edge views, by index or (``order="score"``) by |score|, largest first."""
        idx = torch.nonzero(self.in_graph).flatten() if in_graph_only else torch.arange(len(self.scores))
        if order == "score":
            idx = idx[torch.argsort(self.scores[idx].abs(), descending=True, stable=True)]
        return [self.edge(e) for e in idx.tolist()]

    def edge_index(self, src: str, dst: str) -> int:
        """The index of the edge ``src -> dst``; DataError if there is none."""
        try:
            return self._lookup[(src, dst)]
        except KeyError:
            raise DataError(f"{src} -> {dst} is not a token edge of this graph ({self.component.n_layers} layers, "
                            f"{self.n_pos} positions); edges look like 'a0.h1@3 -> a1.h2<k>@3', "
                            f"'a1.h2:k@3 -> a1.h2@7'") from None

    @cached_property
    def _lookup(self) -> dict[tuple[str, str], int]:
        return {(e.src, e.dst): i for i, e in enumerate(self.edges())}

    # -- circuit views ------------------------------------------------------------------------------------
    def node_in_graph(self, in_graph: torch.Tensor | None = None) -> torch.Tensor:
        """(n_nodes,) bool: nodes touching a circuit edge (the logits: reached by one)."""
        edges = self.in_graph if in_graph is None else in_graph
        src, dst = self.endpoints
        inside = torch.zeros(self.n_nodes_total, dtype=torch.bool)
        inside[src[edges]] = True
        inside[dst[edges]] = True
        return inside

    @property
    def n_nodes(self) -> int:
        return int(self.node_in_graph().sum())

    def component_circuit(self) -> Graph:
        """The component-level summary (§5.2): u -> v is in if some (u, t) -> (v, t) residual edge is; the
        score of u -> v sums its token edges' scores."""
        c, R = self.component, self.n_residual
        f, b, _ = self.residual_index.unbind(1)
        inside = torch.zeros(c.n_forward, c.n_backward, dtype=torch.bool)
        inside[f[self.in_graph[:R]], b[self.in_graph[:R]]] = True
        scores = torch.zeros(c.n_forward, c.n_backward).index_put_((f, b), self.scores[:R], accumulate=True)
        return c.with_scores(scores).with_circuit(inside)

    def attention_pairs_in_circuit(self) -> int:
        """(layer, head, query, key) pairs with their key or value edge in the circuit."""
        if not self.n_attn:
            return 0
        l, h, _, i, j = self.attn_index[self.in_graph[self.n_residual:]].unbind(1)
        return len({(a, b_, c_, d) for a, b_, c_, d in zip(l.tolist(), h.tolist(), i.tolist(), j.tolist())})

    def masks(self, in_graph: torch.Tensor | None = None, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """What patching reads: (missing (n_forward, n_backward, pos) float, 1 = the residual edge carries its
        corrupted value; kept (n_layers, n_heads, 2, pos_q, pos_k) bool, True = the attention edge is in the
        circuit or is no edge)."""
        edges = (self.in_graph if in_graph is None else in_graph).bool()
        c, R = self.component, self.n_residual
        missing = torch.zeros(c.n_forward, c.n_backward, self.n_pos)
        f, b, t = self.residual_index[~edges[:R]].unbind(1)
        missing[f, b, t] = 1.0
        kept = torch.ones(c.n_layers, c.n_heads, 2, self.n_pos, self.n_pos, dtype=torch.bool)
        if self.n_attn:
            l, h, kv, i, j = self.attn_index[~edges[R:]].unbind(1)
            kept[l, h, kv, i, j] = False
        return missing.to(device), kept.to(device)

    # -- serialisation ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """cfg, the component summary (``nodes``/``edges``, EAP-IG names) and ``token_edges`` (every edge)."""
        summary = self.component_circuit().to_dict()
        share = self.open_share
        token_edges = []
        for e, edge in enumerate(self.edges()):
            rec = edge.to_dict()
            if edge.type == "attn":
                rec["gate"] = 1 if self.gated else None
                if share is not None:
                    layer, head, _, i, j = self.attn_index[e - self.n_residual].tolist()
                    rec["open_share"] = float(share[layer, head, i, j])
            token_edges.append(rec)
        return {"schema_version": TOKEN_SCHEMA_VERSION,
                "cfg": {**summary["cfg"], "level": "token", "n_pos": self.n_pos,
                        "metric_positions": list(self.metric_positions), "gated": self.gated, **self.meta},
                "nodes": summary["nodes"], "edges": summary["edges"], "token_edges": token_edges}

    @classmethod
    def from_dict(cls, data: dict) -> TokenGraph:
        if data.get("schema_version", TOKEN_SCHEMA_VERSION) != TOKEN_SCHEMA_VERSION:
            raise DataError(f"token graph schema_version {data.get('schema_version')!r} is not supported "
                            f"(expected {TOKEN_SCHEMA_VERSION})")
        try:
            cfg = dict(data["cfg"])
            n_layers, n_heads, T = int(cfg.pop("n_layers")), int(cfg.pop("n_heads")), int(cfg.pop("n_pos"))
            parallel, gated = bool(cfg.pop("parallel_attn_mlp", False)), bool(cfg.pop("gated", False))
            metric_positions = [int(p) for p in cfg.pop("metric_positions")]
            cfg.pop("level", None)
            token_edges = data["token_edges"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"token circuit JSON lacks {exc}; it needs cfg.n_layers, n_heads, n_pos, "
                            "metric_positions and token_edges") from None
        component = Graph.from_shape(n_layers, n_heads, parallel_attn_mlp=parallel)
        pairs = torch.zeros(n_layers, n_heads, T, T, dtype=torch.bool)
        share = torch.zeros(n_layers, n_heads, T, T) if any("open_share" in r for r in token_edges) else None
        for rec in token_edges:
            if rec.get("type") == "attn":
                layer, head, _, j = _parse(rec["src"])
                i = _parse(rec["dst"])[3]
                pairs[layer, head, i, j] = True
                if share is not None and "open_share" in rec:
                    share[layer, head, i, j] = float(rec["open_share"])
        graph = cls.build(component, n_pos=T, metric_positions=metric_positions, attn_pairs=pairs, gated=gated,
                          open_share=share, meta=cfg)
        scores, inside = torch.zeros_like(graph.scores), torch.zeros_like(graph.in_graph)
        for rec in token_edges:
            e = graph.edge_index(rec["src"], rec["dst"])
            scores[e], inside[e] = float(rec.get("score", 0.0)), bool(rec.get("in_graph", False))
        return dataclasses.replace(graph, scores=scores, in_graph=inside)


def _parse(name: str) -> tuple[int, int, str | None, int]:
    """``a3.h1:k@7`` -> (3, 1, "k", 7); DataError for other names."""
    m = _NAME.match(name)
    node = m and re.match(r"^a(\d+)\.h(\d+)$", m["node"])
    if not node:
        raise DataError(f"{name!r} is not a head's node name (expected like 'a3.h1:k@7' or 'a3.h1@9')")
    return int(node[1]), int(node[2]), m["kv"], int(m["pos"])


def _count(component: Graph, n_pos: int, metric_positions, attn_pairs: torch.Tensor) -> int:
    per_pos = int(component.real[:, :component.logits_slot].sum())
    return per_pos * n_pos + component.n_forward * len(set(metric_positions)) + 2 * int(attn_pairs.sum())


# ------------------------------------------------------------------------------------------ selection
def prune(graph: TokenGraph, in_graph: torch.Tensor) -> torch.Tensor:
    """The fixed point of node/edge pruning of ``in_graph`` (n_edges,) bool; a new tensor."""
    src, dst = graph.endpoints
    kind = graph.node_kind
    is_input, is_logits = kind == 0, kind == 4
    edges = in_graph.bool().clone()
    while True:
        has_out = torch.zeros(graph.n_nodes_total, dtype=torch.bool)
        has_in = torch.zeros(graph.n_nodes_total, dtype=torch.bool)
        has_out[src[edges]] = True
        has_in[dst[edges]] = True
        keep = (has_in | is_input) & (has_out | is_logits)
        pruned = edges & keep[src] & keep[dst]
        if torch.equal(pruned, edges):
            return pruned
        edges = pruned


def greedy_order(graph: TokenGraph, *, absolute: bool = True) -> torch.Tensor:
    """Edge indices in the order greedy growth from the logits adds them (edges that never connect to the
    logits come last, by rank): ``greedy(n)`` is the first n of it, pruned."""
    rank = (graph.scores.abs() if absolute else graph.scores).tolist()
    src, dst = graph.endpoints
    order_by_dst = torch.argsort(dst, stable=True)
    counts = torch.bincount(dst, minlength=graph.n_nodes_total)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
    by_dst = order_by_dst.tolist()
    src_l = src.tolist()
    heap: list[tuple[float, int]] = []

    def push_into(node):
        for e in by_dst[starts[node]:starts[node + 1]]:
            heapq.heappush(heap, (-rank[e], e))

    seen = set(torch.nonzero(graph.node_kind == 0).flatten().tolist())  # inputs need no incoming edges
    for node in torch.nonzero(graph.node_kind == 4).flatten().tolist():
        push_into(node)
    order = []
    while heap:
        _, e = heapq.heappop(heap)
        order.append(e)
        if src_l[e] not in seen:
            seen.add(src_l[e])
            push_into(src_l[e])
    chosen = torch.zeros(len(rank), dtype=torch.bool)
    chosen[order] = True
    rest = torch.nonzero(~chosen).flatten()
    rest = rest[torch.argsort(torch.tensor(rank)[rest], descending=True, stable=True)] if len(rest) else rest
    return torch.cat([torch.tensor(order, dtype=torch.long), rest])


def topn_order(graph: TokenGraph, *, absolute: bool = True) -> torch.Tensor:
    rank = graph.scores.abs() if absolute else graph.scores
    return torch.argsort(rank, descending=True, stable=True)


TOKEN_SELECTIONS = {"greedy": greedy_order, "topn": topn_order}


def selection_order(graph: TokenGraph, how: str = "greedy", *, absolute: bool = True) -> torch.Tensor:
    try:
        fn = TOKEN_SELECTIONS[how]
    except KeyError:
        raise ConfigError(f"selection {how!r} is unknown; choose one of {', '.join(sorted(TOKEN_SELECTIONS))}") from None
    return fn(graph, absolute=absolute)


def select_tokens(graph: TokenGraph, n: int, *, how: str = "greedy", absolute: bool = True,
                  order: torch.Tensor | None = None) -> TokenGraph:
    """The circuit of the first ``n`` edges of the selection order (computed once and passed as ``order``
    in sweeps), pruned."""
    if n < 0:
        raise ConfigError(f"circuit size must be >= 0, got {n!r}")
    order = selection_order(graph, how, absolute=absolute) if order is None else order
    chosen = torch.zeros(len(graph.scores), dtype=torch.bool)
    chosen[order[:int(n)]] = True
    return graph.with_circuit(prune(graph, chosen))


# ------------------------------------------------------------------------------------------ networkx
def token_networkx(graph: TokenGraph, *, in_graph_only: bool = True):
    """A networkx DiGraph of token nodes. Node attributes: kind (input/attn/mlp/kv/logits), layer, head, pos,
    qkv ("" unless a key/value input); edge attributes: type (residual/attn), qkv, score, in_graph."""
    import networkx as nx

    kinds = ("input", "attn", "mlp", "kv", "logits")
    g = nx.DiGraph()
    src, dst = graph.endpoints
    keep = graph.in_graph if in_graph_only else torch.ones_like(graph.in_graph)
    for e in torch.nonzero(keep).flatten().tolist():
        edge = graph.edge(e)
        for node in (int(src[e]), int(dst[e])):
            name = graph.node_name(node)
            if name not in g:
                layer, head, qkv = _node_parts(name)
                g.add_node(name, kind=kinds[int(graph.node_kind[node])], layer=layer, head=head,
                           pos=int(name.rsplit("@", 1)[1]), qkv=qkv)
        g.add_edge(graph.node_name(int(src[e])), graph.node_name(int(dst[e])), type=edge.type, qkv=edge.qkv or "",
                   score=edge.score, in_graph=edge.in_graph, label=f"{edge.src} -> {edge.dst}")
    return g


def _node_parts(name: str) -> tuple[int, int, str]:
    node = name.split("@")[0]
    m = re.match(r"^a(\d+)\.h(\d+)(?::([kv]))?$", node)
    if m:
        return int(m[1]), int(m[2]), m[3] or ""
    m = re.match(r"^m(\d+)$", node)
    return (int(m[1]) if m else -1), -1, ""
