"""Choosing a circuit from edge scores, and pruning it to a fixed point (docs/circuits.md, "Choosing and checking a circuit", EAP-IG ``Graph``).

- ``topn``: the n edges with the largest |score|, then prune.
- ``greedy``: grow from the logits backwards: candidates are the edges into nodes already in the circuit
  (at first only edges into the logits); repeatedly add the candidate with the largest |score| and, when
  its parent is new, make the parent's incoming edges candidates; stop after n edges, then prune.
- ``threshold``: the edges with |score| >= tau, then prune.
``prune`` repeats until nothing changes: a node stays only if it has a circuit edge out and a circuit edge
in (a head's edges in are those into any of its q/k/v slots; the input needs none; the logits always
stay), and edges touching a dropped node go. At the fixed point every circuit edge lies on an
input -> ... -> logits path. The post-prune edge count can be smaller than n; report that count.
"""

from __future__ import annotations

import heapq
from typing import Callable

import torch

from spartan_cli.circuit.graph import Graph
from spartan_cli.errors import ConfigError


def prune(graph: Graph, in_graph: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed point of node/edge pruning of ``in_graph`` (default: the graph's circuit); a new tensor."""
    edges = (graph.in_graph if in_graph is None else in_graph).clone() & graph.real
    owner = graph.slot_owner  # (n_backward,) source index of each slot's node, -1 for the logits
    heads_and_mlps = owner >= 0
    while True:
        has_out = edges.any(dim=1)  # (n_forward,)
        slot_fed = edges[:, heads_and_mlps].any(dim=0).long()  # (slots of heads and MLPs,)
        has_in = torch.zeros(graph.n_forward, dtype=torch.long).index_add_(0, owner[heads_and_mlps], slot_fed) > 0
        has_in[0] = True  # the input needs no incoming edge
        keep = has_out & has_in  # (n_forward,)
        keep_slot = torch.ones(graph.n_backward, dtype=torch.bool)  # the logits always stay
        keep_slot[heads_and_mlps] = keep[owner[heads_and_mlps]]
        pruned = edges & keep[:, None] & keep_slot[None, :]
        if torch.equal(pruned, edges):
            return pruned
        edges = pruned


def _rank(graph: Graph, absolute: bool) -> torch.Tensor:
    return graph.scores.abs() if absolute else graph.scores


def topn(graph: Graph, n: int, *, absolute: bool = True) -> Graph:
    """The n best-scoring edges, pruned."""
    flat = _rank(graph, absolute).masked_fill(~graph.real, -torch.inf).flatten()
    n = min(int(n), graph.n_real_edges)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if n > 0:
        chosen[torch.topk(flat, n).indices] = True
    return graph.with_circuit(prune(graph, chosen.view_as(graph.real)))


def threshold(graph: Graph, tau: float, *, absolute: bool = True) -> Graph:
    """Every edge scoring at least ``tau``, pruned."""
    return graph.with_circuit(prune(graph, (_rank(graph, absolute) >= tau) & graph.real))


def greedy(graph: Graph, n: int, *, absolute: bool = True) -> Graph:
    """n edges grown from the logits backwards by score, pruned."""
    rank = _rank(graph, absolute)
    up = graph.n_upstream.tolist()
    owner = graph.slot_owner.tolist()
    slots_of: dict[int, list[int]] = {}  # source index -> its destination slots
    for slot, node in enumerate(owner):
        slots_of.setdefault(node, []).append(slot)

    heap: list[tuple[float, int, int]] = []

    def push_edges_into(slots):
        for b in slots:
            column = rank[:up[b], b].tolist()
            for f, s in enumerate(column):
                heapq.heappush(heap, (-s, f, b))

    chosen = torch.zeros_like(graph.real)
    in_circuit = {0}  # the input needs no incoming edges
    push_edges_into([graph.logits_slot])
    added = 0
    while heap and added < n:
        _, f, b = heapq.heappop(heap)
        chosen[f, b] = True
        added += 1
        if f not in in_circuit:
            in_circuit.add(f)
            push_edges_into(slots_of[f])
    return graph.with_circuit(prune(graph, chosen))


SELECTIONS: dict[str, Callable[..., Graph]] = {"greedy": greedy, "topn": topn}


def select(graph: Graph, n: int, *, how: str = "greedy", absolute: bool = True) -> Graph:
    """A circuit of (at most) ``n`` edges chosen from ``graph.scores`` by a registered selection."""
    try:
        fn = SELECTIONS[how]
    except KeyError:
        raise ConfigError(f"selection {how!r} is unknown; choose one of {', '.join(sorted(SELECTIONS))}") from None
    if n < 0:
        raise ConfigError(f"circuit size must be >= 0, got {n!r}")
    return fn(graph, n, absolute=absolute)
