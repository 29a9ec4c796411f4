"""spartan circuit: the report agrees with an independent re-evaluation of the circuit it wrote, gates
forced open give the base model's circuit, files round-trip, GQA works, and bad input gives one line."""

import json
import math
import subprocess
import sys

import pytest
import torch

from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import attach_gates
from spartan_cli.circuit import ContrastBatch, Curve, CurvePoint, evaluate
from spartan_cli.circuit.curve import refine_sizes
from spartan_cli.circuit.driver import METHOD_NAMES, CircuitConfig
from spartan_cli.circuit.export import dot_text, graphml_text
from spartan_cli.circuit.run import find_circuit, read_circuit
from spartan_cli.cli.main import main
from spartan_cli.config import GateConfig
from spartan_cli.errors import ConfigError
from spartan_cli.gating.scopes import deterministic_gates
from spartan_cli.tasks import Task, get_task
from tests.micro import BUILDERS, VOCAB

N = 24  # addition pairs per run: enough for a stable curve, fast on one thread
FAST = ["--n-examples", str(N), "--batch-size", "12", "--method", "eap", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def gated_addition(out, *, bias: float):
    """A spartan checkpoint of the built-in addition model with untrained gates at ``bias``."""
    from spartan_cli.hf.models import load_model

    model, tok, source = load_model("addition")
    gate = GateConfig(bias=bias)
    attach_gates(model, gate)
    return checkpoint.save(out, model, tok, meta={"gate": gate.to_dict(), "base_model": source,
                                                  "base_model_name": "addition"})


@pytest.fixture(scope="module")
def sparse_ckpt(tmp_path_factory):
    return gated_addition(tmp_path_factory.mktemp("gated") / "ckpt", bias=0.0)


def run_json(argv, capsys) -> dict:
    main(argv + ["--json"])
    return json.loads(capsys.readouterr().out)


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_report_matches_a_fresh_evaluation_of_the_written_circuit(sparse_ckpt, tmp_path, capsys):
    """The edges needed are the smallest post-prune size whose running max reaches the level, and the
    circuit saved in circuit.json, patched again from scratch, has the faithfulness the report states."""
    out = tmp_path / "out"
    report = run_json(["circuit", str(sparse_ckpt), "--out", str(out)] + FAST, capsys)
    s = report["model"]
    assert report["kind"] == "circuit" and report["base"] is None and s["gated"]
    assert "recomputed" in s["gates"]
    best = -math.inf
    for row in sorted(s["curve"], key=lambda r: (r["edges"], r["requested"])):
        best = max(best, row["faithfulness"])
        if best >= 0.9:
            assert s["reached"] and s["edges_needed"] == row["edges"]
            break
    else:
        assert not s["reached"] and s["edges_needed"] is None
    result = read_circuit(out / "circuit.json")
    assert result.graph.n_edges == s["circuit"]["edges"] and result.graph.n_nodes == s["circuit"]["nodes"]
    model, tok = checkpoint.load(sparse_ckpt)
    task = get_task("addition")
    again = evaluate(model, [task.contrast(tok, n=N, seed=0)], metric=task.metric, circuits=[result.graph])
    assert again.faithfulness(again.metrics[0]) == pytest.approx(s["circuit"]["faithfulness"], abs=1e-4)
    assert again.clean == pytest.approx(s["baselines"]["clean"], abs=1e-4)
    assert s["timing"]["attribution_s"] > 0 and len(s["top_heads"]) == 10


def test_minimize_leaves_a_circuit_no_single_edge_can_leave(sparse_ckpt, tmp_path, capsys):
    """--minimize: the written circuit, patched again from scratch, still reaches the level, is no larger
    than the sweep's, and dropping any one of its edges (then pruning) falls below the level."""
    from spartan_cli.circuit.select import prune

    out = tmp_path / "out"
    report = run_json(["circuit", str(sparse_ckpt), "--out", str(out), "--minimize"] + FAST, capsys)
    s = report["model"]
    assert s["reached"] and s["minimized"] and s["timing"]["minimize_s"] > 0
    assert s["edges_needed"] == s["circuit"]["edges"] <= s["sweep_circuit"]["edges"]
    result = read_circuit(out / "circuit.json")
    assert result.minimized is not None and result.needed.edges == s["edges_needed"] == result.graph.n_edges
    model, tok = checkpoint.load(sparse_ckpt)
    task = get_task("addition")
    batch = task.contrast(tok, n=N, seed=0)
    graph = result.graph
    without_one = []
    for f, b in torch.nonzero(graph.in_graph).tolist():
        trial = graph.in_graph.clone()
        trial[f, b] = False
        without_one.append(prune(graph, trial))
    with deterministic_gates(model):
        again = evaluate(model, [batch], metric=task.metric, circuits=[graph.in_graph] + without_one, graph=graph)
    f_all = [again.faithfulness(m) for m in again.metrics]
    assert f_all[0] == pytest.approx(s["circuit"]["faithfulness"], abs=1e-4) and f_all[0] >= 0.9
    assert max(f_all[1:]) < 0.9


def test_gates_forced_open_give_the_base_models_circuit(tmp_path, capsys):
    """Gates that are always open compute dense attention: scores, curve and edges needed equal the base's."""
    ckpt = gated_addition(tmp_path / "open", bias=1e4)
    report = run_json(["circuit", str(ckpt), "--compare-base"] + FAST, capsys)
    sparse, dense = report["model"], report["base"]
    assert sparse["gated"] and not dense["gated"] and report["config"]["baseline"] == "addition"
    assert sparse["baselines"]["clean"] == pytest.approx(dense["baselines"]["clean"], abs=1e-3)
    assert [r["edges"] for r in sparse["curve"]] == [r["edges"] for r in dense["curve"]]
    assert [r["faithfulness"] for r in sparse["curve"]] == pytest.approx([r["faithfulness"] for r in dense["curve"]],
                                                                         abs=1e-3)
    assert sparse["edges_needed"] == dense["edges_needed"] and report["comparison"]["edge_ratio"] == 1.0
    att = sparse["attention_edges"]
    assert att["all_heads"] == pytest.approx(att["causal"]) == pytest.approx(dense["attention_edges"]["causal"])
    assert sparse["edge_types"] == dense["edge_types"]  # the same circuit, typed the same way
    assert sum(sparse["edge_types"]["edges"].values()) == sparse["edges_needed"]


def test_files_round_trip_and_the_circuit_is_a_pruned_dag(sparse_ckpt, tmp_path, capsys):
    import networkx as nx

    out = tmp_path / "out"
    main(["circuit", str(sparse_ckpt), "--out", str(out), "--compare-base", "--selection", "topn"] + FAST)
    table = capsys.readouterr().out
    assert "edges for F >= 0.9" in table and "dense / sparse" in table
    for d in (out, out / "base"):
        for name in ("circuit.json", "circuit.graphml", "circuit.dot", "curve.csv", "curve.png", "circuit.png"):
            assert (d / name).stat().st_size > 0, name
        assert (d / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["comparison"] is not None
    data = json.loads((out / "circuit.json").read_text())
    assert {"schema_version", "cfg", "nodes", "edges", "curve", "baselines", "summary"} <= set(data)
    assert data["cfg"]["task"] == "addition:b_units" and data["cfg"]["method"] == "eap" and data["cfg"]["gated"]
    assert "input->a0.h1<q>" in data["edges"] and "m3->logits" in data["edges"]
    result = read_circuit(out / "circuit.json")
    graph = result.graph
    assert read_circuit(out / "circuit.json").to_dict() == result.to_dict()
    assert torch.equal(graph.scores, graph.with_circuit(graph.in_graph).scores)
    g = nx.read_graphml(out / "circuit.graphml")
    assert nx.is_directed_acyclic_graph(g)
    if graph.n_edges:
        for node in g.nodes:  # every kept node lies on an input -> logits path
            assert node == "input" or nx.has_path(g, "input", node)
            assert node == "logits" or nx.has_path(g, node, "logits")
        merged = {(e.parent, e.child) for e in graph.edges(in_graph_only=True)}
        assert set(g.edges) == merged
    dot = (out / "circuit.dot").read_text()
    assert dot == dot_text(graph, title=dot.split('"')[1]) and dot.count(" -> ") == graph.n_edges
    assert graphml_text(graph) == (out / "circuit.graphml").read_text()
    rows = (out / "curve.csv").read_text().splitlines()
    assert rows[0].startswith("requested,edges,nodes") and len(rows) == len(data["curve"]) + 1


class _RandomPairs(Task):
    """Random prompts whose corrupted twin differs in two positions; logit difference at the last one."""

    name = "random-pairs"
    metric_name = "logit_diff"

    def contrast(self, tokenizer, *, n=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        clean = torch.randint(1, VOCAB, (n or 8, 8), generator=g)
        corrupted = clean.clone()
        corrupted[:, 2] = torch.randint(1, VOCAB, (len(clean),), generator=g)
        corrupted[:, 5] = torch.randint(1, VOCAB, (len(clean),), generator=g)
        return ContrastBatch(clean, corrupted, torch.randint(1, VOCAB, (len(clean), 2), generator=g),
                             torch.ones_like(clean))

    def row_scores(self, last, answers):
        return last.gather(1, answers[:, :1])[:, 0] - last.gather(1, answers[:, 1:])[:, 0]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_find_circuit_on_every_architecture(arch):
    """GPT-2, NeoX (parallel attention/MLP) and Llama with grouped-query attention, gated and dense; the
    full circuit recovers the clean metric, and exact scores reach the level with a refined count."""
    model = BUILDERS[arch]()
    if arch == "llama":
        attach_gates(model, GateConfig(bias=0.0))  # about half the gates open
    cfg = CircuitConfig(model=arch, method="exact", n_examples=8, batch_size=4)
    result = find_circuit(model, None, cfg, task=_RandomPairs())
    full = [p for p in result.refined.points if p.edges == result.curve.total_edges]
    assert full and full[0].faithfulness == pytest.approx(1.0, abs=1e-4)
    assert result.reached and result.graph.n_edges == result.point.edges
    below = [p for p in result.refined.points if p.edges < result.point.edges]
    assert all(p.faithfulness < 0.9 for p in below)
    assert result.gated == (arch == "llama") and (result.attention.all_heads < result.attention.causal) == result.gated


def test_refine_sizes_bracket_the_first_size_reaching_the_level():
    def curve(fs):
        pts = tuple(CurvePoint(n, n, 1, f, f) for n, f in fs)
        return Curve(pts, 1.0, 0.0, 1000, "greedy")

    c = curve([(10, 0.2), (20, 0.5), (30, 0.95), (40, 0.8), (100, 1.0)])
    assert refine_sizes(c, 0.9, points=9) == list(range(21, 30))
    assert refine_sizes(c, 0.9, points=3) == [22, 25, 28]
    assert refine_sizes(c, 0.99, points=4) == [52, 64, 76, 88]
    assert refine_sizes(curve([(10, 0.2), (11, 0.95)]), 0.9, points=9) == []
    assert refine_sizes(curve([(10, 0.2)]), 0.9, points=9) == []


def test_config_is_strict_and_validated():
    with pytest.raises(ConfigError, match="valid keys are .*faithfulness"):
        CircuitConfig.from_dict({"model": "m", "faithfullness": 0.9})
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"faithfulness must be in \(0, 1\]"):
            CircuitConfig(model="m", faithfulness=bad)
    with pytest.raises(ConfigError, match="choose one of eap, eap-ig, exact"):
        CircuitConfig(model="m", method="acdc")
    with pytest.raises(ConfigError, match="gate_gradient 'soft' is unknown; choose one of hard, straight-through"):
        CircuitConfig(model="m", gate_gradient="soft")
    cfg = CircuitConfig(model="m", method="eap-ig", gate_gradient="straight-through")
    assert cfg.attribution == "eap-ig-inputs" and CircuitConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_choices_match_the_registries():
    from spartan_cli.circuit.select import SELECTIONS
    from spartan_cli.circuit.taps import GATE_GRADIENTS
    from spartan_cli.cli.circuit import GATE_GRADIENT_CHOICES, METHOD_CHOICES, SELECTION_CHOICES

    assert sorted(METHOD_CHOICES) == sorted(METHOD_NAMES) and sorted(SELECTION_CHOICES) == sorted(SELECTIONS)
    assert sorted(GATE_GRADIENT_CHOICES) == sorted(GATE_GRADIENTS)


def test_help_imports_no_torch():
    code = ("import sys\nfrom spartan_cli.cli.main import main\ntry:\n    main(['circuit', '--help'])\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--compare-base" in done.stdout


def test_bad_input_gives_one_line(sparse_ckpt, tmp_path, capsys):
    err = one_line_error(["circuit", str(sparse_ckpt), "--task", "nope"], capsys)
    assert "task 'nope' is unknown; choose one of addition" in err
    for bad in ("0", "1.5", "-1"):
        err = one_line_error(["circuit", str(sparse_ckpt), "--faithfulness", bad], capsys)
        assert "faithfulness must be in (0, 1]" in err
    err = one_line_error(["circuit", str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in err
    broken = gated_addition(tmp_path / "broken", bias=0.0)
    (broken / "model.safetensors").unlink()
    err = one_line_error(["circuit", str(broken)], capsys)
    assert "model.safetensors' is missing" in err
    err = one_line_error(["circuit", str(sparse_ckpt), "--method", "acdc"], capsys)
    assert "acdc" in err
    err = one_line_error(["circuit", "addition", "--compare-base"], capsys)  # a plain model has no base
    assert "no base model" in err


def test_a_task_the_models_tokenizer_cannot_encode_gives_one_line(sparse_ckpt, capsys):
    err = one_line_error(["circuit", str(sparse_ckpt), "--task", "ioi", *FAST], capsys)
    assert "cannot encode the task's text" in err and "Missing [UNK]" in err and "pick a task made for" in err
