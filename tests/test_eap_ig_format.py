"""Circuits in EAP-IG / MIB graph JSON: the export has exactly the fields and edge names that format
documents, it round-trips, and `spartan circuit --evaluate-circuit` evaluates such a file."""

import json

import pytest
import torch

from spartan_cli.circuit import Graph, select
from spartan_cli.circuit.run import read_graph_file
from spartan_cli.exports import ExportConfig, export
from tests.test_cli_sparsify import run_cli
from tests.test_export import circuit_json  # noqa: F401  (fixture)


def eap_ig_edge_names(n_layers: int, n_heads: int, parallel: bool) -> set[str]:
    """The edges of EAP-IG's graph, from its documented construction: every node already written to the
    residual stream feeds each head's q, k and v input ("X->a{l}.h{h}<q>"), then (after the layer's heads,
    or beside them when attention and MLP run in parallel) the MLP ("X->m{l}"), and everything the logits."""
    stream, names = ["input"], set()
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names |= {f"{x}->{h}<{qkv}>" for x in stream for h in heads for qkv in "qkv"}
        mlp_reads = stream if parallel else stream + heads
        names |= {f"{x}->m{layer}" for x in mlp_reads}
        stream = stream + heads + [f"m{layer}"]
    return names | {f"{x}->logits" for x in stream}


@pytest.mark.parametrize("parallel", [False, True])
def test_edge_names_are_eap_igs(parallel):
    g = Graph.from_shape(3, 2, parallel_attn_mlp=parallel)
    assert set(g.to_eap_ig()["edges"]) == eap_ig_edge_names(3, 2, parallel)
    assert set(g.to_eap_ig()["nodes"]) == {"input", "logits"} | {f"a{l}.h{h}" for l in range(3) for h in range(2)} | {
        f"m{l}" for l in range(3)}


def test_export_round_trips_through_the_documented_fields(circuit_json, tmp_path):  # noqa: F811
    path, circuit = circuit_json
    export(ExportConfig(source=str(path), format="eap-ig", out=str(tmp_path / "graph.json")))
    data = json.loads((tmp_path / "graph.json").read_text())
    assert set(data) == {"cfg", "nodes", "edges"}  # what Graph.from_json asserts, nothing else
    assert {"n_layers", "n_heads", "parallel_attn_mlp"} <= set(data["cfg"])
    assert all(set(rec) == {"score", "in_graph"} for rec in data["edges"].values())
    assert all(isinstance(rec["in_graph"], bool) for rec in data["nodes"].values())
    for edge in circuit.edges():
        assert data["edges"][edge.name] == {"score": pytest.approx(edge.score), "in_graph": edge.in_graph}
    back = read_graph_file(tmp_path / "graph.json")
    assert torch.equal(back.in_graph, circuit.in_graph) and torch.allclose(back.scores, circuit.scores)
    assert back.n_edges == circuit.n_edges == sum(rec["in_graph"] for rec in data["edges"].values())


def test_model_graphs_carry_d_model_for_eap_ig():
    from tests.micro import BUILDERS

    assert Graph.from_model(BUILDERS["llama"]()).to_eap_ig()["cfg"]["d_model"] == BUILDERS["llama"]().config.hidden_size


def _write(graph: Graph, path):
    path.write_text(json.dumps(graph.to_eap_ig()))
    return path


@pytest.mark.slow
def test_evaluate_circuit_full_is_clean_and_empty_is_corrupted(tmp_path, capsys):
    """On the built-in addition model: every edge gives F = 1 (the clean run), none F = 0 (the corrupted one),
    a circuit in between something in between."""
    from spartan_cli.builtin import module

    model, _ = module("addition").load_model()
    full = Graph.from_model(model)
    empty = full.with_circuit(torch.zeros_like(full.in_graph))
    some = select(full.with_scores(torch.rand(full.real.shape, generator=torch.Generator().manual_seed(0))), 60,
                  how="topn")
    got = {}
    for name, g in (("full", full), ("empty", empty), ("some", some)):
        code, out, err = run_cli(["circuit", "addition", "--evaluate-circuit", str(_write(g, tmp_path / f"{name}.json")),
                                  "--n-examples", "16", "--json", "--quiet"], capsys)
        assert code == 0, err
        got[name] = json.loads(out)["model"]
    assert got["full"]["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert got["empty"]["faithfulness"] == pytest.approx(0.0, abs=1e-5)
    assert got["full"]["metric"] == pytest.approx(got["full"]["baselines"]["clean"], abs=1e-5)
    assert got["some"]["edges"] == some.n_edges and got["full"]["edges"] == full.n_real_edges


def test_evaluate_circuit_of_another_shape_is_one_line(tmp_path, capsys):
    path = _write(Graph.from_shape(12, 12), tmp_path / "gpt2.json")
    code, _, err = run_cli(["circuit", "addition", "--evaluate-circuit", str(path), "--quiet"], capsys)
    assert code == 1 and "12 layers x 12 heads" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text(json.dumps({"cfg": {"n_layers": 4, "n_heads": 4}, "edges": {"x->y": {}}}))
    code, _, err = run_cli(["circuit", "addition", "--evaluate-circuit", str(tmp_path / "bad.json"), "--quiet"], capsys)
    assert code == 1 and "'x->y' is not an edge" in err
