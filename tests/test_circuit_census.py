"""The edge census: circuit edges counted by type, at the component and the token level. No model weights."""

import torch

from spartan_cli.circuit import Graph
from spartan_cli.circuit.census import component_census, token_census
from spartan_cli.circuit.tokens import TokenGraph


def _named(graph: Graph, names: list[str]) -> Graph:
    inside = torch.zeros_like(graph.in_graph)
    for name in names:
        inside[graph.edge_index(name)] = True
    return graph.with_circuit(inside)


def test_component_census_types_each_edge_by_its_ends_and_counts_every_edge():
    graph = _named(Graph.from_shape(2, 2), ["input->a0.h1<v>", "a0.h1->a1.h0<k>", "a0.h0->a1.h0<k>",
                                            "a1.h0->m1", "m1->logits", "input->logits"])
    census = component_census(graph)
    assert census["edges"] == {"attn->attn<k>": 2, "attn->mlp": 1, "input->attn<v>": 1, "input->logits": 1,
                               "mlp->logits": 1}
    assert sum(census["total"].values()) == graph.n_real_edges
    # by hand: 2 heads of layer 1 read q, k, v from input, 2 heads of layer 0 and m0
    assert census["total"]["attn->attn<q>"] == 2 * 2
    assert census["total"]["input->attn<k>"] == 2 + 2


def test_token_census_splits_attention_edges_by_reach_and_layer():
    component = Graph.from_shape(2, 2)
    pairs = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 2, 4, 4).clone()
    tokens = TokenGraph.build(component, n_pos=4, metric_positions=(3,), attn_pairs=pairs)
    chosen = [("a1.h0:v@2", "a1.h0@3"), ("a1.h0:k@2", "a1.h0@3"), ("a0.h1:v@0", "a0.h1@2"),
              ("a0.h1:v@3", "a0.h1@3"), ("a0.h1@2", "a1.h0<k>@2"), ("a1.h0@3", "logits@3")]
    inside = torch.zeros_like(tokens.in_graph)
    for src, dst in chosen:
        inside[tokens.edge_index(src, dst)] = True
    census = token_census(tokens.with_circuit(inside))
    assert census["edges"] == {"attention k previous": 1, "attention v farther": 1, "attention v previous": 1,
                               "attention v self": 1, "residual attn->attn<k>": 1, "residual attn->logits": 1}
    assert census["attention_by_layer"] == {"0": 2, "1": 2}
    assert sum(census["total"].values()) == tokens.n_real_edges
    # 10 causal pairs per head, k and v, 4 heads; reach 0 (4 pairs), 1 (3), > 1 (3)
    assert census["total"]["attention k self"] == 4 * 4 and census["total"]["attention v farther"] == 3 * 4
