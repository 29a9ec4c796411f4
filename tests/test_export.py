"""spartan export: each format opens in its consumer and says what the checkpoint says.

hf: plain ``from_pretrained`` after ``import spartan_cli`` (either import order) gives the logits of
``spartan_cli.load``; dense-hf: a plain model with the dense logits; masks: every open pair recounted by the
attention forward's own counters; graphs: networkx reads GraphML and node-link JSON with the circuit's edges.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spartan_cli
from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import attach_gates
from spartan_cli.cli.main import main
from spartan_cli.config import GateConfig
from spartan_cli.exports import FORMATS, ExportConfig, export
from spartan_cli.gating.scopes import gates_open, no_dropout

SEQ_LEN = 16


def make_checkpoint(out, model_dir, text_file, *, bias: float = 0.0) -> Path:
    """A spartan checkpoint of a tiny model with untrained gates at ``bias`` (0: about half shut)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gate = GateConfig(bias=bias)
    attach_gates(model, gate)
    meta = {"gate": gate.to_dict(), "base_model": str(model_dir), "base_model_name": "tiny",
            "data": {"source": str(text_file), "seq_len": SEQ_LEN, "heldout_blocks": 4}}
    return checkpoint.save(out, model, tok, meta=meta)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def ckpt(request, tmp_path_factory, tiny_text_file):
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    return make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{request.param}"), model_dir, tiny_text_file)


IDS = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12, 250, 8, 31, 64]])  # (batch 1, pos 12)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (1, pos, vocab)


def test_hf_round_trip_gives_the_logits_of_load(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    result = export(ExportConfig(source=str(ckpt), format="hf", out=str(out)))
    assert result.out == out and (out / "config.json") in result.files
    config = json.loads((out / "config.json").read_text())
    assert config["attn_implementation"] == "spartan" and config["spartan_gate"] == {"kind": "paper", "bias": 0.0}
    assert "auto_map" not in config  # no remote code

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config._attn_implementation == "spartan"
    reference, _ = spartan_cli.load(ckpt)
    got, want = logits_of(loaded), logits_of(reference)
    assert (got - want).abs().max() <= 1e-5
    with gates_open(reference):
        dense = logits_of(reference)
    assert (got - dense).abs().max() > 1e-2  # the gates really act: half of them are shut at b = 0
    loaded.train()  # deterministic gates also in training mode (no sampling outside spartan's trainer)
    with torch.no_grad(), no_dropout(loaded):
        assert (loaded(input_ids=IDS).logits - want).abs().max() <= 1e-5
    # the export is also a spartan checkpoint (evaluate/density read it)
    again, _ = spartan_cli.load(out)
    assert (logits_of(again) - want).abs().max() <= 1e-5


def test_dense_hf_is_a_plain_model_with_the_dense_logits(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    spartan_cli.export(ckpt, format="dense-hf", out=out)
    config = json.loads((out / "config.json").read_text())
    assert "spartan_gate" not in config and "attn_implementation" not in config
    assert not (out / checkpoint.META).exists()
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config._attn_implementation != "spartan"
    reference, _ = spartan_cli.load(ckpt)
    with gates_open(reference):
        dense = logits_of(reference)
    assert (logits_of(plain) - dense).abs().max() <= 1e-4  # sdpa vs the gated forward with every gate open


SCRIPT = """
import sys, torch
first = sys.argv[2]
if first == "transformers":
    import transformers.modeling_utils
    assert "spartan_cli" not in sys.modules
import spartan_cli
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file
ref = load_file(sys.argv[1] + "/ref.safetensors")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/hf")
with torch.no_grad():
    got = model(input_ids=ref["ids"]).logits
print(float((got - ref["logits"]).abs().max()))
"""


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~8 s each on 2 busy cores
@pytest.mark.parametrize("first", ["spartan_cli", "transformers"])
def test_hf_loads_in_a_fresh_process_whatever_is_imported_first(tiny_gpt2_dir, tiny_text_file, tmp_path, first):
    from safetensors.torch import save_file

    ck = make_checkpoint(tmp_path / "ckpt", tiny_gpt2_dir, tiny_text_file)
    export(ExportConfig(source=str(ck), format="hf", out=str(tmp_path / "hf")))
    reference, _ = spartan_cli.load(ck)
    save_file({"ids": IDS, "logits": logits_of(reference).contiguous()}, str(tmp_path / "ref.safetensors"))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), first], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


def test_import_spartan_cli_imports_neither_torch_nor_transformers():
    code = ("import sys, spartan_cli\nfrom spartan_cli.cli.main import main\n"
            "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
            "from spartan_cli.hf.registration import _RegisterOnImport\n"
            "assert isinstance(sys.meta_path[0], _RegisterOnImport), 'registration hook not installed'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in FORMATS:
        assert name in done.stdout  # every registered format is offered and explained


def test_masks_are_the_open_gates_the_forward_counts(ckpt, tmp_path):
    from spartan_cli.hf.subjects import load_subject
    from spartan_cli.measure.evaluate import eval_data
    from spartan_cli.measure.heldout import measure

    out = tmp_path / "masks.jsonl"
    result = export(ExportConfig(source=str(ckpt), format="masks", out=str(out), batch_size=3))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    subject = load_subject(str(ckpt))
    blocks = eval_data(subject).blocks
    assert [r["sequence"] for r in records] == list(range(len(blocks))) == list(range(result.details["sequences"]))
    m = measure(subject.model, blocks, batch_size=len(blocks))  # counts from the attention forward's GateStats
    counted = torch.zeros_like(m.open_pairs)  # (n_layers, n_heads)
    for r, ids in zip(records, blocks.input_ids.tolist()):
        assert r["token_ids"] == ids and len(r["tokens"]) == len(ids)
        assert len(r["open"]) == r["n_layers"] and all(len(layer) == r["n_heads"] for layer in r["open"])
        n_open = 0
        for layer, heads in enumerate(r["open"]):
            for head, pairs in enumerate(heads):
                assert all(0 <= k <= q < len(ids) for q, k in pairs)  # causal
                assert pairs == sorted(pairs) and len({tuple(p) for p in pairs}) == len(pairs)
                counted[layer, head] += len(pairs)
                n_open += len(pairs)
        pos = len(ids)
        assert math.isclose(r["density"], n_open / (r["n_layers"] * r["n_heads"] * pos * (pos + 1) / 2))
    assert torch.equal(counted, m.open_pairs)
    assert 0 < result.details["open_pairs"] < m.open_pairs.numel() * m.allowed_pairs  # neither empty nor all open


def test_masks_for_prompts_keep_the_text(ckpt, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    main(["export", str(ckpt), "--format", "masks", "--prompt", "The king walked", "--prompt", "A dog",
          "--out", str(out), "--json", "-q"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "masks" and summary["sequences"] == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == ["The king walked", "A dog"]
    assert "".join(records[1]["tokens"]) == "A dog"
    for r in records:  # the first query can only read itself
        assert all(p[0] != 0 or p == [0, 0] for layer in r["open"] for h in layer for p in h)


def test_masks_report_progress_unless_quiet(ckpt, tmp_path, capsys):
    args = ["export", str(ckpt), "--format", "masks", "--max-sequences", "3", "--overwrite", "--out",
            str(tmp_path / "m.jsonl")]
    main(args)
    err = capsys.readouterr().err
    assert "open gates per sequence" in err and "3/3" in err  # a plain line per tenth off a terminal
    main(args + ["--quiet"])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------- circuit graphs
@pytest.fixture(scope="module")
def circuit_json(tmp_path_factory):
    """A circuit.json as ``spartan circuit --out`` writes it, for a 2-layer, 3-head graph with seeded scores."""
    from spartan_cli.circuit import Curve, CurvePoint, Graph, select
    from spartan_cli.circuit.discovery import CircuitResult, top_heads
    from spartan_cli.circuit.files import result_dict, write_text

    g = Graph.from_shape(2, 3, meta={"model": "tiny", "task": "addition", "method": "eap"})
    scores = torch.randn(g.real.shape, generator=torch.Generator().manual_seed(0))
    scored = g.with_scores(scores)
    circuit = select(scored, 12, how="topn")
    point = CurvePoint(12, circuit.n_edges, circuit.n_nodes, 1.0, 0.95)
    curve = Curve((point,), 2.0, 0.0, scored.n_real_edges, "topn")
    result = CircuitResult("tiny", True, circuit, curve, curve, 0.9, top_heads(circuit, 3), None, {}, 8)
    path = tmp_path_factory.mktemp("circuit") / "circuit.json"
    return write_text(path, json.dumps(result_dict(result, kind="circuit_graph")) + "\n"), circuit


def test_graphml_and_node_link_open_in_networkx_with_the_circuit(circuit_json, tmp_path):
    import networkx as nx

    path, circuit = circuit_json
    want_nodes = {n.name for n in circuit.nodes() if n.in_graph}
    want_pairs = {(e.parent, e.child) for e in circuit.edges(in_graph_only=True)}
    export(ExportConfig(source=str(path), format="graphml", out=str(tmp_path / "c.graphml")))
    export(ExportConfig(source=str(path.parent), format="json", out=str(tmp_path / "c.json")))  # the folder works too
    g1 = nx.read_graphml(tmp_path / "c.graphml")
    g2 = nx.node_link_graph(json.loads((tmp_path / "c.json").read_text()), edges="edges")
    for g in (g1, g2):
        assert set(g.nodes) == want_nodes and set(g.edges) == want_pairs
        assert nx.is_directed_acyclic_graph(g)


def test_dot_and_rendered_formats(circuit_json, tmp_path, monkeypatch, capsys):
    path, circuit = circuit_json
    export(ExportConfig(source=str(path), format="dot", out=str(tmp_path / "c.dot")))
    dot = (tmp_path / "c.dot").read_text()
    assert dot.startswith("digraph") and dot.count(" -> ") == circuit.n_edges  # one line per q/k/v slot
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no graphviz: one line naming the package
    with pytest.raises(SystemExit) as exc:
        main(["export", str(path), "--format", "svg", "--out", str(tmp_path / "c.svg")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and "graphviz" in err and "apt install graphviz" in err
    assert not (tmp_path / "c.svg").exists()


def test_existing_out_needs_overwrite(circuit_json, tmp_path, capsys):
    path, _ = circuit_json
    target = tmp_path / "c.graphml"
    target.write_text("old")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(path), "--format", "graphml", "--out", str(target)])
    assert exc.value.code == 1 and "--overwrite" in capsys.readouterr().err and target.read_text() == "old"
    main(["export", str(path), "--format", "graphml", "--out", str(target), "--overwrite", "-q"])
    assert target.read_text().startswith("<graphml")


def test_bad_input_is_one_line(tmp_path, capsys):
    for argv, needle in [(["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "o")], "spartan.json"),
                         (["export", str(tmp_path), "--format", "nope", "--out", "x"], "nope"),
                         (["export", str(tmp_path / "none.json"), "--format", "graphml", "--out", "x"], "circuit")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and err.count("\n") == 1 and needle in err, err
