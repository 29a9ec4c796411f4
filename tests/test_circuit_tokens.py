"""Token-level circuits on micro models: full and empty circuits give the clean and corrupted metrics,
patching a pair whose gate is shut changes nothing, value scores are exact in v and every score is the
derivative of patching, token patching agrees with component patching, circuits are pruned DAGs, JSON
round-trips, and ``find_circuit(level="token")`` works end to end (and refuses tasks without one layout)."""

import json
from functools import partial

import networkx as nx
import pytest
import torch

from spartan_cli.gating.attention import attach_gates, gate_states
from spartan_cli.circuit import ContrastBatch, Graph, evaluate, wired
from spartan_cli.circuit.driver import CircuitConfig
from spartan_cli.circuit.run import find_circuit, read_circuit, write_all
from spartan_cli.circuit.token_patching import (TokenPatch, _corrupted_and_clean, attribute_tokens, evaluate_tokens,
                                                mixed_attention)
from spartan_cli.circuit.tokens import TokenGraph, prune, select_tokens, selection_order, token_networkx
from spartan_cli.config import GateConfig
from spartan_cli.errors import ConfigError, TaskError
from spartan_cli.gating.scopes import keeping_gate_logits
from spartan_cli.tasks import Task
from tests.micro import BUILDERS, contrast, logit_difference

ARCHS = sorted(BUILDERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


_contrast = partial(contrast, rows=6, pos=7, corrupt=(1, 4))


def _model(arch, *, gated, bias=0.0, double=False):
    model = BUILDERS[arch]()
    if double:
        model = model.double()
    if gated:
        attach_gates(model, GateConfig(bias=bias))
    return model


@pytest.mark.parametrize("gated", [False, True], ids=["dense", "gated"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_circuit_gives_clean_and_empty_gives_corrupted(arch, gated):
    model = _model(arch, gated=gated)
    batch = _contrast()
    graph = attribute_tokens(model, [batch], metric=logit_difference)
    full = torch.ones_like(graph.in_graph)
    result = evaluate_tokens(model, [batch], metric=logit_difference, graph=graph, circuits=[full, ~full])
    assert result.clean != pytest.approx(result.corrupted, abs=1e-4)
    assert result.metrics[0] == pytest.approx(result.clean, abs=1e-5)
    assert result.metrics[1] == pytest.approx(result.corrupted, abs=1e-5)
    causal = 7 * 8 // 2
    n_pairs = int(graph.attn_pairs.sum())
    assert graph.n_attn == 2 * n_pairs  # a key and a value edge per pair
    assert (n_pairs < 2 * 4 * causal) if gated else (n_pairs == 2 * 4 * causal)


def _shut_everywhere_but_one(model, batch):
    """(layer, head, i, j, open_row, shut_row): a pair at the last query and a corrupted key, open on the
    clean run of one prompt and shut on another's."""
    with torch.no_grad(), keeping_gate_logits(model) as states:
        model(input_ids=batch.clean)
        for layer, state in enumerate(states):
            opened = state.gate_logits > 0  # (batch, n_heads, q, k)
            mixed = opened.any(0) & ~opened.all(0)
            corrupted_key = torch.zeros(opened.shape[-1], dtype=torch.bool)
            corrupted_key[[1, 4]] = True  # keys whose corrupted k/v differ from the clean ones in every layer
            mixed = mixed & corrupted_key[None, None, :]
            for h, i, j in torch.nonzero(mixed).tolist():
                if i == opened.shape[-2] - 1:  # the query the metric reads
                    rows = opened[:, h, i, j]
                    return layer, h, i, j, int(torch.nonzero(rows)[0]), int(torch.nonzero(~rows)[0])
    raise AssertionError("no pair both open and shut")


def test_patching_a_pair_whose_gate_is_shut_changes_nothing():
    """Patching the key and value of one (query, key) pair leaves every prompt whose gate for that pair is
    shut on the clean run bit-identical (the pair is no edge there), and changes the prompt where it is open."""
    model = _model("gpt2", gated=True, bias=0.0)
    batch = _contrast(rows=8)
    layer, head, i, j, open_row, shut_row = _shut_everywhere_but_one(model, batch)
    component = Graph.from_model(model)
    L, H, T = component.n_layers, component.n_heads, batch.clean.shape[1]
    kept = torch.ones(L, H, 2, T, T)
    kept[layer, head, :, i, j] = 0.0  # key and value of the pair carry corrupted values
    with torch.no_grad(), wired(model, component) as wiring:
        delta, corr_kv, edges, mask, _, clean_logits = _corrupted_and_clean(wiring, batch, component,
                                                                          next(model.parameters()), 32)
        assert edges[layer][open_row, head, i, j] and not edges[layer][shut_row, head, i, j]
        tap = TokenPatch(component, delta.clone(), torch.zeros(component.n_forward, component.n_backward, T), kept,
                         corr_kv, edges)
        patched = wiring.run(batch.clean, tap=tap)
    assert torch.equal(patched[shut_row], clean_logits[shut_row])
    assert not torch.allclose(patched[open_row, i], clean_logits[open_row, i], atol=1e-6)


def test_value_patch_changes_the_head_output_by_exactly_a_times_the_value_difference():
    """y_i is linear in v_j: replacing v_j by v'_j for query i alone moves y_i by A_ij (v'_j - v_j) and
    nothing else; a shut gate (A_ij = 0) moves nothing."""
    g = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 3, 5, 4
    q, k, v, v_alt = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    model = _model("gpt2", gated=True, bias=0.0)
    module = model.transformer.h[0].attn
    from spartan_cli.gating.attention import gated_attention_forward

    base = mixed_attention(module, gated_attention_forward, q, k, v, None, scaling=0.5)
    b, h, i = 1, 2, 4
    shut = torch.nonzero(~base.edges[b, h, i]).flatten().tolist()
    opened = torch.nonzero(base.edges[b, h, i]).flatten().tolist()
    assert shut and opened
    for j in opened + shut:
        keep = torch.ones(B, H, T, T, dtype=torch.float64)
        keep[b, h, i, j] = 0.0
        out = mixed_attention(module, gated_attention_forward, q, k, v, None, scaling=0.5, k_alt=k, v_alt=v_alt,
                              keep_k=torch.ones_like(keep), keep_v=keep)
        moved = out.y - base.y  # (batch, n_heads, pos, d_head)
        expected = torch.zeros_like(moved)
        expected[b, h, i] = base.a[b, h, i, j] * (v_alt[b, h, j] - v[b, h, j])
        torch.testing.assert_close(moved, expected, atol=1e-12, rtol=0)
        if j in shut:
            assert torch.equal(out.y, base.y)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scores_are_the_derivative_of_patching_each_edge(arch):
    """For the top residual, key and value edges, the score equals d/d eps of the metric when eps of the
    corrupted value is patched into that edge alone (central difference, float64; Llama with GQA)."""
    model = _model(arch, gated=False, double=True)
    batch = _contrast(rows=4)
    graph = attribute_tokens(model, [batch], metric=logit_difference)
    component, T = graph.component, graph.n_pos
    R = graph.n_residual
    picks = []
    for lo, hi in ((0, R), (R, graph.n_residual + graph.n_attn)):
        part = graph.scores[lo:hi].abs()
        picks += (lo + torch.topk(part, 3).indices).tolist()
    kinds = graph.attn_index[:, 2]
    for kv in (0, 1):  # the best key and the best value edge
        idx = torch.nonzero(kinds == kv).flatten()
        picks.append(R + int(idx[torch.argmax(graph.scores[R + idx].abs())]))
    eps = 1e-4 if arch == "gpt2" else 3e-2  # Llama's RMSNorm computes in float32
    with torch.no_grad(), wired(model, component) as wiring:
        delta, corr_kv, edges, mask, _, _ = _corrupted_and_clean(wiring, batch, component, next(model.parameters()),
                                                                 model.config.hidden_size)
        for e in picks:
            values = []
            for sign in (1, -1):
                missing = torch.zeros(component.n_forward, component.n_backward, T, dtype=torch.float64)
                kept = torch.ones(component.n_layers, component.n_heads, 2, T, T, dtype=torch.float64)
                if e < R:
                    f, b, t = graph.residual_index[e].tolist()
                    missing[f, b, t] = sign * eps
                else:
                    layer, h, kv, i, j = graph.attn_index[e - R].tolist()
                    kept[layer, h, kv, i, j] = 1 - sign * eps
                tap = TokenPatch(component, delta.clone(), missing, kept, corr_kv, edges)
                values.append(float(logit_difference(wiring.run(batch.clean, tap=tap), batch)))
            derivative = (values[0] - values[1]) / (2 * eps)
            assert graph.scores[e].item() == pytest.approx(derivative, rel=2e-3, abs=1e-7), graph.edge(e)


def test_gate_gradient_changes_only_gated_token_scores():
    """straight-through vs hard: a dense model's token scores are equal; a gated model's differ, except the
    residual edges into the logits (no gate lies between them and the metric)."""
    batch = [_contrast(rows=4)]
    for gated in (False, True):
        model = _model("gpt2", gated=gated, bias=0.5)
        hard, st = (attribute_tokens(model, batch, metric=logit_difference, gate_gradient=gg)
                    for gg in ("hard", "straight-through"))
        if not gated:
            assert torch.equal(hard.scores, st.scores) and st.meta["gate_gradient"] is None
            continue
        assert st.meta["gate_gradient"] == "straight-through"
        into_logits = hard.residual_index[:, 1] == hard.component.logits_slot
        assert into_logits.any() and torch.equal(hard.scores[:hard.n_residual][into_logits],
                                                 st.scores[:st.n_residual][into_logits])
        assert (hard.scores != st.scores).any()
    with pytest.raises(ConfigError, match="gate gradient 'soft' is unknown"):
        attribute_tokens(model, batch, metric=logit_difference, gate_gradient="soft")


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_token_patching_agrees_with_component_patching(arch):
    """A token circuit holding every attention edge and, at every position, the residual edges of a
    component circuit gives that component circuit's metric (NeoX: parallel attention and MLP)."""
    model = _model(arch, gated=True, bias=0.5)
    batch = _contrast()
    graph = attribute_tokens(model, [batch], metric=logit_difference)
    component = graph.component
    g = torch.Generator().manual_seed(3)
    circuits = [component.real & (torch.rand(component.real.shape, generator=g) < p) for p in (0.3, 0.7)]
    token_circuits = []
    for c in circuits:
        f, b, _ = graph.residual_index.unbind(1)
        token_circuits.append(torch.cat([c[f, b], torch.ones(graph.n_attn, dtype=torch.bool)]))
    by_component = evaluate(model, [batch], metric=logit_difference, circuits=circuits, graph=component)
    by_token = evaluate_tokens(model, [batch], metric=logit_difference, graph=graph, circuits=token_circuits)
    for a, b in zip(by_component.metrics, by_token.metrics):
        assert a == pytest.approx(b, abs=1e-5)
    assert by_component.metrics[0] != pytest.approx(by_component.metrics[1], abs=1e-4)


def _graph(gated=True):
    model = _model("gpt2", gated=gated, bias=0.5)
    return attribute_tokens(model, [_contrast()], metric=logit_difference)


@pytest.mark.parametrize("how", ["greedy", "topn"])
def test_circuits_are_pruned_dags(how):
    graph = _graph()
    order = selection_order(graph, how)
    for n in (1, 5, 40, 200, graph.n_real_edges):
        circuit = select_tokens(graph, n, order=order)
        assert circuit.n_edges <= n
        assert torch.equal(prune(graph, circuit.in_graph), circuit.in_graph)  # a fixed point
        g = token_networkx(circuit)
        assert nx.is_directed_acyclic_graph(g)
        for node, attrs in g.nodes(data=True):
            if attrs["kind"] != "input":
                assert any(g.nodes[a]["kind"] == "input" for a in nx.ancestors(g, node)), node
            if attrs["kind"] != "logits":
                assert any(g.nodes[d]["kind"] == "logits" for d in nx.descendants(g, node)), node
        assert circuit.n_nodes == g.number_of_nodes()
    full = select_tokens(graph, graph.n_real_edges, order=order)
    last_layer_head_early = "a1.h0@2"  # the last layer's heads reach the logits at the metric position only
    assert last_layer_head_early not in token_networkx(full)


def test_greedy_circuits_grow_from_the_logits():
    graph = _graph()
    order = selection_order(graph, "greedy")
    first = graph.edge(int(order[0]))
    assert first.dst.startswith("logits@") and abs(first.score) == max(
        abs(graph.edge(e).score) for e in range(graph.n_residual) if graph.edge(e).dst.startswith("logits@"))


def test_component_summary_and_json_round_trip(tmp_path):
    graph = _graph()
    circuit = select_tokens(graph, 30)
    comp = circuit.component_circuit()
    f, b, _ = circuit.residual_index[circuit.in_graph[:circuit.n_residual]].unbind(1)
    assert comp.n_edges == len(set(zip(f.tolist(), b.tolist())))
    assert comp.scores.sum().item() == pytest.approx(circuit.scores[:circuit.n_residual].sum().item(), rel=1e-5)
    data = json.loads(json.dumps(circuit.to_dict()))
    assert data["cfg"]["level"] == "token" and data["cfg"]["gated"] is True
    attn = [e for e in data["token_edges"] if e["type"] == "attn"]
    assert attn and all(e["gate"] == 1 and 0 < e["open_share"] <= 1 for e in attn)
    assert any(e["src"].endswith(f"@{e['src'].split('@')[1]}") and ":k@" in e["src"] for e in attn)
    back = TokenGraph.from_dict(data)
    assert torch.equal(back.scores, circuit.scores) and torch.equal(back.in_graph, circuit.in_graph)
    assert torch.equal(back.attn_pairs, circuit.attn_pairs) and back.metric_positions == circuit.metric_positions
    torch.testing.assert_close(back.open_share, circuit.open_share)
    assert Graph.from_dict({"cfg": data["cfg"], "edges": data["edges"]}).n_edges == comp.n_edges  # EAP-IG reader


class _Pairs(Task):
    """Random prompts of one layout; logit difference at the last position."""

    name = "pairs"
    metric_name = "logit_diff"
    fixed_layout = True

    def contrast(self, tokenizer, *, n=None, seed=0):
        batch = _contrast(rows=n or 6, seed=seed)
        return ContrastBatch(batch.clean, batch.corrupted, batch.answers, torch.ones_like(batch.clean))

    def row_scores(self, last, answers):
        return last.gather(1, answers[:, :1])[:, 0] - last.gather(1, answers[:, 1:])[:, 0]


def test_find_token_circuit_end_to_end_and_files(tmp_path):
    model = _model("gpt2", gated=True, bias=0.5)
    cfg = CircuitConfig(model="micro", method="eap", n_examples=6, batch_size=3, level="token")
    result = find_circuit(model, None, cfg, task=_Pairs())
    full = [p for p in result.refined.points if p.requested == result.curve.total_edges]
    assert full and full[0].faithfulness == pytest.approx(1.0, abs=1e-4)
    assert result.reached and result.graph.n_edges == result.point.edges
    assert all(p.faithfulness < 0.9 for p in result.refined.points if p.edges < result.point.edges)
    again = evaluate_tokens(model, [_Pairs().contrast(None, n=6)], metric=_Pairs().metric, graph=result.graph,
                            circuits=[result.graph])
    assert again.faithfulness(again.metrics[0]) == pytest.approx(result.point.faithfulness, abs=1e-5)
    summary = result.summary()
    assert summary["anatomy"]["token_edges"] == result.point.edges
    assert set(summary["anatomy"]["by_metric_position"]) == {"6"}
    census = summary["edge_types"]  # the circuit's edges, every one typed once
    assert sum(census["edges"].values()) == result.point.edges
    assert sum(n for k, n in census["edges"].items() if k.startswith("attention")) == summary["anatomy"]["attention_edges"]
    paths = write_all(result, tmp_path / "out", command="test")
    assert {p.name for p in paths} >= {"circuit.json", "circuit.graphml", "circuit.dot", "curve.csv"}
    back = read_circuit(tmp_path / "out" / "circuit.json")
    assert torch.equal(back.graph.in_graph, result.graph.in_graph) and back.point == result.point
    assert nx.read_graphml(tmp_path / "out" / "circuit.graphml").number_of_edges() > 0


def test_minimized_token_circuit_is_one_minimal_and_round_trips(tmp_path):
    """minimize=True: the token circuit still reaches the level when patched again, is no larger than the
    sweep's, no single edge can leave it, and circuit.json keeps the minimized point."""
    model = _model("gpt2", gated=True, bias=0.5)
    cfg = CircuitConfig(model="micro", method="eap", n_examples=6, batch_size=6, level="token", minimize=True)
    result = find_circuit(model, None, cfg, task=_Pairs())
    assert result.reached and result.minimized is not None and result.needed is result.minimized
    assert result.graph.n_edges == result.minimized.edges <= result.point.edges
    graph = result.graph
    without_one = []
    for e in torch.nonzero(graph.in_graph).flatten().tolist():
        trial = graph.in_graph.clone()
        trial[e] = False
        without_one.append(prune(graph, trial))
    again = evaluate_tokens(model, [_Pairs().contrast(None, n=6)], metric=_Pairs().metric, graph=graph,
                            circuits=[graph.in_graph] + without_one)
    f_all = [again.faithfulness(m) for m in again.metrics]
    assert f_all[0] == pytest.approx(result.minimized.faithfulness, abs=1e-5) and f_all[0] >= 0.9
    assert max(f_all[1:]) < 0.9
    summary = result.summary()
    assert summary["minimized"] and summary["edges_needed"] == graph.n_edges
    assert summary["sweep_circuit"]["edges"] == result.point.edges
    write_all(result, tmp_path / "out", command="test")
    back = read_circuit(tmp_path / "out" / "circuit.json")
    assert back.minimized == result.minimized and torch.equal(back.graph.in_graph, graph.in_graph)


def test_token_level_needs_a_fixed_layout_and_a_gradient_method():
    model = _model("gpt2", gated=False)

    class Templates(_Pairs):
        fixed_layout = False

    with pytest.raises(TaskError, match="one layout"):
        find_circuit(model, None, CircuitConfig(model="m", method="eap", level="token"), task=Templates())
    with pytest.raises(ConfigError, match="token level"):
        CircuitConfig(model="m", method="exact", level="token")
    with pytest.raises(ConfigError, match="level"):
        CircuitConfig(model="m", level="pixel")
    assert gate_states  # imported for readers: gated models carry GateState


def test_prompts_of_several_lengths_share_a_layout():
    """Right-padded prompts that end at different positions (as addition's do): the logits nodes sit at
    every row's last real position, padded queries hold no edges, and full/empty circuits still give the
    clean and corrupted metrics of a metric read at each row's last real token."""
    from spartan_cli.tasks import final_logits

    def metric(logits, batch):
        last = final_logits(logits, batch)
        return (last.gather(1, batch.answers[:, :1]) - last.gather(1, batch.answers[:, 1:])).mean()

    base = _contrast(rows=6, pos=7)
    mask = torch.ones_like(base.clean)
    for row, length in enumerate((5, 6, 7, 5, 6, 7)):
        mask[row, length:] = 0
    batch = ContrastBatch(base.clean * mask, base.corrupted * mask, base.answers, mask)
    for gated in (False, True):
        model = _model("gpt2", gated=gated, bias=0.5)
        graph = attribute_tokens(model, [batch], metric=metric)
        assert graph.metric_positions == (4, 5, 6)
        assert graph.edge(graph.n_residual - 1).dst == "logits@6"
        full = torch.ones_like(graph.in_graph)
        result = evaluate_tokens(model, [batch], metric=metric, graph=graph, circuits=[full, ~full])
        assert result.metrics[0] == pytest.approx(result.clean, abs=1e-5)
        assert result.metrics[1] == pytest.approx(result.corrupted, abs=1e-5)
        if not gated:  # every causal pair of a query some prompt has: 2 layers x 4 heads x 28 pairs
            assert int(graph.attn_pairs.sum()) == 2 * 4 * 28


def test_spartan_export_reads_a_token_circuit(tmp_path, capsys):
    from spartan_cli.cli.main import main

    model = _model("gpt2", gated=True, bias=0.5)
    cfg = CircuitConfig(model="micro", method="eap", n_examples=6, batch_size=6, level="token", refine_rounds=0)
    result = find_circuit(model, None, cfg, task=_Pairs())
    from spartan_cli.circuit.files import result_dict

    (tmp_path / "circuit.json").write_text(json.dumps(result_dict(result, kind="token_circuit")))
    for fmt in ("graphml", "dot", "json"):
        main(["export", str(tmp_path / "circuit.json"), "--format", fmt, "--out", str(tmp_path / f"c.{fmt}")])
    g = nx.read_graphml(tmp_path / "c.graphml")
    assert g.number_of_edges() == result.graph.n_edges
    assert {d["type"] for _, _, d in g.edges(data=True)} <= {"residual", "attn"}
    assert "->" in (tmp_path / "c.dot").read_text() and "@" in (tmp_path / "c.dot").read_text()


@pytest.mark.slow  # two models, two sweeps over ~6,000 token edges, plots: seconds
def test_cli_token_level_compare_base(tmp_path, capsys):
    """`spartan circuit CKPT --level token --compare-base --json` on a gated built-in addition model: both
    models report token edges, the ratio is base / sparse, and the files are token files."""
    from spartan_cli.training import checkpoint
    from spartan_cli.cli.main import main
    from spartan_cli.hf.models import load_model

    model, tok, source = load_model("addition")
    gate = GateConfig(bias=1.0)
    attach_gates(model, gate)
    ckpt = checkpoint.save(tmp_path / "ckpt", model, tok, meta={"gate": gate.to_dict(), "base_model": source,
                                                                "base_model_name": "addition"})
    argv = ["circuit", str(ckpt), "--level", "token", "--compare-base", "--n-examples", "4", "--batch-size", "4",
            "--method", "eap", "-q", "--out", str(tmp_path / "out"), "--json"]
    main(argv)
    report = json.loads(capsys.readouterr().out)
    sparse, dense = report["model"], report["base"]
    assert sparse["gated"] and not dense["gated"] and sparse["level_kind"] == dense["level_kind"] == "token"
    assert sparse["anatomy"]["graph"]["attention_pairs"] < dense["anatomy"]["graph"]["attention_pairs"]
    assert dense["anatomy"]["graph"]["metric_positions"] == sparse["anatomy"]["graph"]["metric_positions"]
    if sparse["reached"] and dense["reached"]:
        ratio = report["comparison"]["edge_ratio"]
        assert ratio == pytest.approx(dense["edges_needed"] / sparse["edges_needed"])
    data = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert data["kind"] == "token_circuit" and data["cfg"]["gated"] is True
    assert json.loads((tmp_path / "out" / "base" / "circuit.json").read_text())["cfg"]["gated"] is False
    with pytest.raises(SystemExit) as exc:
        main(["circuit", str(ckpt), "--level", "token", "--method", "exact"])
    assert exc.value.code == 1 and "token level" in capsys.readouterr().err


def test_token_table_shows_both_models_and_their_ratio(capsys, monkeypatch):
    from spartan_cli.circuit.run import CircuitRun

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells at the terminal width
    from spartan_cli.cli.circuit import _print_token_tables

    cfg = CircuitConfig(model="micro", method="eap", n_examples=6, batch_size=6, level="token", refine_rounds=0,
                        faithfulness=0.5)
    sparse = find_circuit(_model("gpt2", gated=True, bias=0.5), None, cfg, task=_Pairs(), name="sparse")
    dense = find_circuit(_model("gpt2", gated=False), None, cfg, task=_Pairs(), name="dense")
    run = CircuitRun(model=sparse, base=dense, config={"method": "eap", "selection": "greedy"},
                     task={"task": "pairs", "metric": "logit_diff"})
    _print_token_tables(run)
    out = capsys.readouterr().out
    assert "token edges for F >= 0.5" in out and "of which the corruption reaches" in out
    assert f"{run.edge_ratio:.1f}x" in out
    assert f"{sparse.point.edges:,} / {sparse.curve.total_edges:,}" in out
