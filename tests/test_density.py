"""spartan density: the counts equal a recount by hand from q and k, and the command reports them."""

import json

import pytest
import torch

from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import attach_gates
from spartan_cli.blocks import TokenBlocks
from spartan_cli.cli.main import main
from spartan_cli.config import GateConfig
from spartan_cli.measure.density import DensityResult, density, prompt_attention
from spartan_cli.gating.scopes import keeping_gate_logits
from tests.micro import VOCAB, gpt2

SEQ_LEN = 32


def make_checkpoint(out, model_dir, text_file, *, bias: float, heldout_blocks: int = 6):
    """A spartan checkpoint of the tiny GPT-2 in ``model_dir`` gated at ``bias`` (no training needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    gate = GateConfig(bias=bias)
    attach_gates(model, gate)
    meta = {"gate": gate.to_dict(), "base_model": str(model_dir), "base_model_name": "tiny-gpt2",
            "data": {"source": str(text_file), "seq_len": SEQ_LEN, "heldout_blocks": heldout_blocks}}
    return checkpoint.save(out, model, tok, meta=meta)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_gpt2_dir, tiny_text_file):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_gpt2_dir, tiny_text_file, bias=0.0)


def recount_gpt2(model, ids, bias):
    """Open gates per (layer, head) and keys read per (layer, head, query), from q and k computed by hand:
    q, k = split(c_attn(ln_1(h_l))), g = q.k / sqrt(d_head) + b, open iff g > 0 on a causal pair."""
    n_heads = model.config.n_head
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # n_layers + 1 of (batch, pos, d_model)
        opens, keys = [], []
        for layer, block in enumerate(model.transformer.h):
            x = block.ln_1(hidden[layer])  # (batch, pos, d_model)
            q, k, _ = block.attn.c_attn(x).split(model.config.n_embd, dim=-1)
            b, t, d = q.shape
            q = q.view(b, t, n_heads, d // n_heads).transpose(1, 2)  # (batch, n_heads, pos, d_head)
            k = k.view(b, t, n_heads, d // n_heads).transpose(1, 2)
            g = q @ k.transpose(-1, -2) / (d // n_heads) ** 0.5 + bias  # (batch, n_heads, pos, pos)
            causal = torch.ones(t, t, dtype=torch.bool).tril()
            is_open = (g > 0) & causal
            opens.append(is_open.sum((0, 2, 3)))  # (n_heads,)
            keys.append(is_open.sum(-1))  # (batch, n_heads, pos)
    return torch.stack(opens), keys


def test_density_equals_recount_from_q_and_k():
    torch.manual_seed(3)
    model = gpt2()
    with torch.no_grad():  # init std 0.02 gives scores ~1e-4: widen them so b = 0.5 leaves gates both open and shut
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(25.0)
    bias = 0.5
    attach_gates(model, GateConfig(bias=bias))
    ids = torch.randint(0, VOCAB, (5, 20))
    result = density(model, TokenBlocks(ids, ids.clone()), batch_size=2)
    opens, keys = recount_gpt2(model, ids, bias)
    n_pairs = 5 * 20 * 21 // 2
    assert torch.equal(result.open_pairs, opens)
    assert torch.equal(result.allowed_pairs, torch.full_like(opens, n_pairs))
    assert result.density == float(opens.sum()) / (opens.numel() * n_pairs)
    assert 0.05 < result.density < 0.95  # a test with every gate open or shut would prove little
    assert torch.equal(result.max_keys, torch.stack([k.amax((0, 2)) for k in keys]))
    assert torch.equal(result.empty_rows, torch.stack([(k == 0).sum((0, 2)) for k in keys]))
    assert torch.equal(result.open_by_pos, torch.stack([k.sum((0, 1)) for k in keys]))
    assert result.mean_keys_per_query == float(opens.sum()) / (2 * 4 * 5 * 20)


def test_spartan_density_json_equals_recount_from_raw_gate_logits(ckpt, capsys):
    """The acceptance check: `spartan density CKPT --json` against a recount from the raw g of every layer."""
    from spartan_cli.hf.subjects import load_subject
    from spartan_cli.measure.evaluate import eval_data

    main(["density", str(ckpt), "--json", "-q"])
    report = json.loads(capsys.readouterr().out)

    subject = load_subject(str(ckpt))
    blocks = eval_data(subject).blocks  # the checkpoint's held-out blocks
    open_, allowed = 0, 0
    per_head = torch.zeros(2, 4, dtype=torch.long)
    with torch.no_grad(), keeping_gate_logits(subject.model) as states:
        for batch in blocks.batches(3):
            subject.model(input_ids=batch.input_ids)
            for layer, s in enumerate(states):
                g = s.gate_logits  # (batch, n_heads, pos, pos), -inf on pairs a query may not see
                per_head[layer] += (g > 0).sum((0, 2, 3))
                open_ += int((g > 0).sum())
                allowed += int(torch.isfinite(g).sum())
    assert allowed == 2 * 4 * len(blocks) * SEQ_LEN * (SEQ_LEN + 1) // 2
    assert report["overall"]["open_pairs"] == open_
    assert report["overall"]["allowed_pairs"] == allowed
    assert report["overall"]["density"] == open_ / allowed
    assert report["counts"]["open_pairs"] == per_head.tolist()
    assert report["schema_version"] == 1 and report["kind"] == "density"
    assert report["gates"]["source"] == "checkpoint" and report["data"]["split"] == "heldout"


def test_heads_shut_and_queries_reading_nothing():
    model = gpt2()
    attach_gates(model, GateConfig(bias=0.0))
    d = model.config.n_embd
    d_head = d // model.config.n_head
    with torch.no_grad():  # layer 1, head 2: q = 0 so g = 0 + b = 0, never > 0
        model.transformer.h[1].attn.c_attn.weight[:, 2 * d_head:3 * d_head] = 0
        model.transformer.h[1].attn.c_attn.bias[2 * d_head:3 * d_head] = 0
    ids = torch.randint(0, VOCAB, (3, 12))
    result = density(model, TokenBlocks(ids, ids.clone()))
    assert result.heads_shut == [(1, 2)]
    assert result.empty_rows[1, 2] == 3 * 12  # every query of that head reads nothing
    out = result.to_dict()
    assert out["heads_shut"] == [[1, 2]]
    assert out["overall"]["share_heads_shut"] == 1 / 8
    assert out["per_layer"][1]["heads_shut"] == 1


def test_result_round_trips_through_json():
    model = attach_gates(gpt2(), GateConfig(bias=0.1))
    ids = torch.randint(0, VOCAB, (2, 9))
    result = density(model, TokenBlocks(ids, ids.clone()))
    back = DensityResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert back.to_dict() == result.to_dict()


def test_prompt_weights_are_pattern_times_gates(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spartan_cli.measure.density import dense_pattern

    model = attach_gates(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval(), GateConfig(bias=0.0))
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    p = prompt_attention(model, tok, "The king found the castle.")
    n = len(p.tokens)
    assert p.weights.shape == p.gates.shape == (2, 4, n, n)
    assert not p.gates.triu(1).any()  # no gate above the diagonal
    assert torch.all(p.weights[~p.gates] == 0)
    dense = dense_pattern(model, p.input_ids)  # gates forced open: the softmax pattern, rows sum to 1
    assert torch.allclose(dense.sum(-1), torch.ones(2, 4, n), atol=1e-5)
    # layer 0 sees the same input with or without gates, so there A = P * M with the dense P exactly
    assert torch.equal(p.weights[0], dense[0] * p.gates[0])
    listed = p.to_dict()["open_keys"]["a1.h3"]
    assert listed == [row.nonzero().flatten().tolist() for row in p.gates[1, 3]]


def test_density_plots_and_prompt_pictures(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    main(["density", str(ckpt), "--prompt", "The king.", "--plot", "--out", str(out),
          "--max-batches", "1", "-q"])
    table = capsys.readouterr().out
    assert "density" in table
    names = sorted(p.name for p in out.iterdir())
    assert names == ["attention_graph.png", "attention_layer0.png", "attention_layer1.png", "density.json",
                     "density_by_position.png", "density_heatmap.png"]
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "density.json").read_text())
    assert report["overall"]["sequences"] == 6  # the 6 held-out blocks fit in one batch
    assert report["prompt"]["tokens"] and report["config"]["baseline"]


def test_plain_model_gets_untrained_gates(tiny_gpt2_dir, tiny_text_file, capsys):
    main(["density", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--gate-bias", "100", "--json", "-q",
          "--max-batches", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["gates"] == {"kind": "paper", "bias": 100.0, "source": "attached (untrained)"}
    assert report["overall"]["density"] == 1.0  # b = 100 opens every gate
    assert report["data"]["split"] == "all"


def test_plot_without_out_is_one_line_error(ckpt, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["density", str(ckpt), "--plot"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and "--out" in err
