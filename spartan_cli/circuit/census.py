"""Which kinds of edge a circuit is made of: the count of its edges by type, at either level.

Why: two circuits of different sizes are compared by one number (edges to reach F), and that number
hides where the difference is. A census says it: e.g. a sparse model's token circuit that is smaller
because its attention edges are few, while its residual edges are as many as the dense model's.

1. Component level (``component_census``): each circuit edge ``u -> v<slot>`` is typed by the kinds of
   its ends: ``input``, ``attn`` (a head), ``mlp``; the destination ``attn<q>``/``attn<k>``/``attn<v>``,
   ``mlp`` or ``logits``. Keys look like ``"attn->attn<k>"``.
2. Token level (``token_census``): residual edges typed as above (they join components at one position);
   attention edges (``a{l}.h{h}:k|v@j -> a{l}.h{h}@i``) by ``k``/``v`` and by how far they reach back,
   ``i - j``: ``self`` (0), ``previous`` (1) or ``farther`` (> 1). Also per layer.
Counts cover the circuit's edges (``in_graph``) only; ``total`` counts every edge of the graph by the
same types, so a share of each type can be read off.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch

from spartan_cli.circuit.graph import QKV, Graph

if TYPE_CHECKING:  # the component level imports this module too; it never loads the token level
    from spartan_cli.circuit.tokens import TokenGraph

KV = QKV[1:]  # an attention edge's index: 0 = key, 1 = value (tokens.KV)


def _kind(name: str) -> str:
    """``input`` / ``attn`` / ``mlp`` / ``logits`` of a source or slot name (``a2.h1<k>`` -> ``attn<k>``)."""
    if name.startswith("a"):
        return "attn" + (name[-3:] if name.endswith(">") else "")
    return "mlp" if name.startswith("m") else name


def _residual_types(component: Graph) -> list[list[str]]:
    """(n_forward, n_backward) nested list of each residual edge's type, ``"attn->mlp"``."""
    return [[f"{_kind(s)}->{_kind(d)}" for d in component.slot_names] for s in component.source_names]


def component_census(graph: Graph) -> dict:
    """``{"edges": {type: n}, "total": {type: n}}`` over the component graph's circuit and all its edges."""
    types = _residual_types(graph)
    inside, real = Counter(), Counter()
    for f, b in torch.nonzero(graph.real).tolist():
        real[types[f][b]] += 1
        if graph.in_graph[f, b]:
            inside[types[f][b]] += 1
    return {"edges": dict(sorted(inside.items())), "total": dict(sorted(real.items()))}


def _reach(distance: int) -> str:
    return "self" if distance == 0 else "previous" if distance == 1 else "farther"


def token_census(graph: TokenGraph) -> dict:
    """Residual edges by component type, attention edges by k/v and reach, and attention edges per layer:
    ``{"edges": {...}, "total": {...}, "attention_by_layer": {layer: n}}`` (circuit edges; ``total``: all)."""
    types = _residual_types(graph.component)
    inside, real, by_layer = Counter(), Counter(), Counter()
    R = graph.n_residual
    circuit = graph.in_graph.tolist()  # every entry of a token graph's edge list is an edge
    for e, (f, b, _t) in enumerate(graph.residual_index.tolist()):
        key = "residual " + types[f][b]
        real[key] += 1
        if circuit[e]:
            inside[key] += 1
    for a, (layer, _head, kv, i, j) in enumerate(graph.attn_index.tolist()):
        key = f"attention {KV[kv]} {_reach(i - j)}"
        real[key] += 1
        if circuit[R + a]:
            inside[key] += 1
            by_layer[layer] += 1
    return {"edges": dict(sorted(inside.items())),
            "total": dict(sorted(real.items())),
            "attention_by_layer": {str(k): v for k, v in sorted(by_layer.items())}}
