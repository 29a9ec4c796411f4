"""The component graph and circuit selection: counts, names, serialisation, pruning. No model weights."""

import networkx as nx
import pytest
import torch

from spartan_cli.circuit import Graph, edge_count, greedy, prune, select, to_networkx, topn
from spartan_cli.errors import ConfigError, DataError


def _brute_force_edges(n_layers, n_heads, parallel):
    """Edges by enumerating 'who writes before whom reads', independent of the index arithmetic."""
    sources = [("input", -1, "out")]
    for l in range(n_layers):
        sources += [(f"a{l}.h{h}", l, "attn") for h in range(n_heads)] + [(f"m{l}", l, "mlp")]
    edges = set()
    for name, layer, kind in sources:
        for l in range(n_layers):
            if layer < l:  # heads of layer l read everything written by earlier layers
                edges |= {f"{name}->a{l}.h{h}<{x}>" for h in range(n_heads) for x in "qkv"}
            if layer < l or (layer == l and kind == "attn" and not parallel):
                edges.add(f"{name}->m{l}")
        edges.add(f"{name}->logits")
    return edges


def test_gpt2_small_has_32491_edges_without_building_weights():
    from transformers import GPT2Config

    graph = Graph.from_config(GPT2Config())  # 12 layers x 12 heads: only the config is read
    assert (graph.n_forward, graph.n_backward) == (157, 445)
    assert graph.n_real_edges == edge_count(12, 12) == 32491
    assert graph.n_edges == 32491  # a fresh graph holds every edge


@pytest.mark.parametrize("parallel", [False, True])
def test_edges_match_the_formula_and_an_enumeration(parallel):
    graph = Graph.from_shape(3, 2, parallel_attn_mlp=parallel)
    names = {e.name for e in graph.edges()}
    assert names == _brute_force_edges(3, 2, parallel)
    assert graph.n_real_edges == len(names) == edge_count(3, 2, parallel_attn_mlp=parallel)


def test_neox_config_gives_a_parallel_graph():
    from transformers import GPTNeoXConfig

    graph = Graph.from_config(GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32))
    assert graph.parallel_attn_mlp
    with pytest.raises(DataError, match="not an edge"):
        graph.edge_index("a1.h0->m1")  # MLP 1 does not read heads of layer 1 in parallel blocks
    assert Graph.from_shape(2, 4).edge("a1.h0->m1").qkv is None


def test_eap_ig_names_round_trip():
    graph = Graph.from_shape(12, 12)
    for name in ("a9.h9->logits", "input->a0.h1<q>", "a5.h5->a7.h3<k>", "m3->m7", "m11->logits"):
        f, b = graph.edge_index(name)
        assert graph.edge_name(f, b) == name == graph.edge(name).name
    assert graph.edge("a5.h5->a7.h3<k>").qkv == "k"
    for bad in ("a0.h1->a0.h2<q>", "logits->m0", "a12.h0->logits", "nonsense"):
        with pytest.raises(DataError):
            graph.edge_index(bad)


def _scored(n_layers=4, n_heads=3, seed=0, parallel=False):
    graph = Graph.from_shape(n_layers, n_heads, parallel_attn_mlp=parallel, meta={"task": "toy"})
    g = torch.Generator().manual_seed(seed)
    return graph.with_scores(torch.randn(graph.n_forward, graph.n_backward, generator=g))


def test_json_round_trip_is_the_identity():
    graph = topn(_scored(), 40)
    back = Graph.from_json(graph.to_json())
    assert torch.equal(back.in_graph, graph.in_graph)
    assert torch.allclose(back.scores, graph.scores)
    assert back.meta == graph.meta and back.parallel_attn_mlp == graph.parallel_attn_mlp
    with pytest.raises(DataError):
        Graph.from_json("{not json")
    with pytest.raises(DataError):
        Graph.from_dict({"cfg": {}})


def _assert_clean_circuit(circuit: Graph):
    g = to_networkx(circuit)
    assert nx.is_directed_acyclic_graph(g)
    if circuit.n_edges == 0:
        return
    for node in g.nodes:
        assert nx.has_path(g, "input", node), node
        assert nx.has_path(g, node, "logits"), node
    assert torch.equal(prune(circuit), circuit.in_graph)  # a fixed point


@pytest.mark.parametrize("how", ["topn", "greedy"])
@pytest.mark.parametrize("parallel", [False, True])
def test_selected_circuits_are_pruned_dags_on_input_logits_paths(how, parallel):
    graph = _scored(parallel=parallel)
    for n in (0, 1, 5, 20, 60, 200, graph.n_real_edges):
        circuit = select(graph, n, how=how)
        assert circuit.n_edges <= n
        _assert_clean_circuit(circuit)
    assert select(graph, graph.n_real_edges, how=how).n_edges == graph.n_real_edges


def test_greedy_grows_from_the_logits_and_topn_keeps_the_best():
    graph = _scored(seed=3)
    circuit = greedy(graph, 1)
    assert circuit.n_edges <= 1
    first = graph.scores[:, graph.logits_slot].abs().argmax()
    if circuit.n_edges:  # one edge survives pruning only if it leaves the input
        assert circuit.in_graph[first, graph.logits_slot]
    for n in (30, 150):
        best = topn(graph, n)
        top = torch.zeros(graph.real.numel(), dtype=torch.bool)
        top[torch.topk(graph.scores.abs().masked_fill(~graph.real, -1).flatten(), n).indices] = True
        assert not (best.in_graph & ~top.view_as(best.in_graph)).any()  # pruning only ever removes edges
    assert best.n_edges > 0

def test_prune_removes_dangling_nodes_to_a_fixed_point():
    graph = Graph.from_shape(3, 1)
    keep = torch.zeros_like(graph.real)
    f, b = graph.edge_index("input->a0.h0<q>"); keep[f, b] = True  # a0.h0 writes nowhere
    f, b = graph.edge_index("a1.h0->a2.h0<v>"); keep[f, b] = True  # a1.h0 reads nothing
    f, b = graph.edge_index("a2.h0->logits"); keep[f, b] = True
    assert prune(graph, keep).sum() == 0  # each removal exposes the next dangling node
    f, b = graph.edge_index("input->a1.h0<k>"); keep[f, b] = True
    kept = graph.with_circuit(prune(graph, keep))
    assert {e.name for e in kept.edges(in_graph_only=True)} == {"input->a1.h0<k>", "a1.h0->a2.h0<v>",
                                                                "a2.h0->logits"}
    assert kept.n_nodes == 4  # input, a1.h0, a2.h0, logits


def test_networkx_export_merges_qkv_slots():
    graph = Graph.from_shape(2, 2)
    keep = torch.zeros_like(graph.real)
    for name in ("input->a1.h0<q>", "input->a1.h0<v>", "a1.h0->logits"):
        keep[graph.edge_index(name)] = True
    g = to_networkx(graph.with_circuit(keep))
    assert set(g.nodes) == {"input", "a1.h0", "logits"}
    assert g.edges["input", "a1.h0"]["qkv"] == "qv"
    assert g.nodes["a1.h0"]["layer"] == 1 and g.nodes["a1.h0"]["kind"] == "attn"


def test_unknown_selection_names_the_valid_ones():
    with pytest.raises(ConfigError, match="greedy, topn"):
        select(_scored(), 3, how="best")


def test_component_and_token_graphs_implement_one_protocol():
    """The search and the files read both graph types through driver.CircuitGraph."""
    import torch

    from spartan_cli.circuit.driver import CircuitGraph
    from spartan_cli.circuit.tokens import TokenGraph

    component = Graph.from_shape(2, 3)
    pairs = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    pairs[:, :, 3, :] = True  # the last query reads every key
    tokens = TokenGraph.build(component, n_pos=4, metric_positions=(3,), attn_pairs=pairs, gated=False)
    for graph in (component, tokens):
        assert isinstance(graph, CircuitGraph), type(graph).__name__
        assert graph.real.shape == graph.scores.shape == graph.in_graph.shape
        assert int(graph.real.sum()) == graph.n_real_edges
        empty = graph.with_circuit(torch.zeros_like(graph.in_graph))
        assert empty.n_edges == 0 and graph.n_edges == graph.n_real_edges  # built with every edge in
        assert len(graph.edges(in_graph_only=True)) == graph.n_edges
        assert sorted(e.score for e in graph.edges()) == sorted(graph.scores[graph.real].tolist())
