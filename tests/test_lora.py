"""`--lora-rank`: adapters on the attention projections, a merged checkpoint plus the adapter, resume, and
the student's own dense view as teacher (skipped without peft: pip install 'spartan-cli[lora]')."""

import json

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

import spartan_cli  # noqa: E402
from spartan_cli.config import GateConfig  # noqa: E402
from spartan_cli.gating.attention import attach_gates, gate_states  # noqa: E402
from spartan_cli.gating.scopes import gates_open, recording  # noqa: E402
from spartan_cli.training import lora  # noqa: E402
from tests.micro import BUILDERS, VOCAB  # noqa: E402
from tests.test_cli_sparsify import FAST, run_cli  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_default_targets_are_the_attention_projections(arch):
    names = lora.target_modules(BUILDERS[arch]())
    ends = {n.rsplit(".", 1)[-1] for n in names}
    assert ends == {"gpt2": {"c_attn", "c_proj"}, "neox": {"query_key_value", "dense"},
                    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"}}[arch]
    assert all(".mlp." not in n for n in names)  # GPT-2's MLP has a c_proj too: not an attention projection
    assert lora.target_modules(BUILDERS["llama"](), ["q_proj", "v_proj"]) == [
        n for n in lora.target_modules(BUILDERS["llama"]()) if n.endswith(("q_proj", "v_proj"))]


def test_merged_weights_equal_the_adapted_model_and_the_view_is_the_dense_base():
    torch.manual_seed(0)
    base = BUILDERS["llama"]()
    model = lora.add_lora(attach_gates(BUILDERS["llama"]()), 4)
    for n, p in model.named_parameters():  # a trained-looking adapter: B != 0
        if ".lora_B." in n:
            p.data.normal_(0, 0.5)
    ids = torch.randint(0, VOCAB, (2, 12))
    merged = attach_gates(BUILDERS["llama"]())
    merged.load_state_dict(lora.merged_state_dict(model))
    with torch.no_grad():
        adapted = model(ids).logits
        assert (merged(ids).logits - adapted).abs().max() < 1e-5
        assert (base(ids).logits - adapted).abs().max() > 1e-2  # the adapter does change the model
        with recording(model) as states:
            model(ids)
            stats = [s.stats for s in states]
            teacher = lora.DenseView(model)(input_ids=ids).logits
            assert all(s.stats is t for s, t in zip(states, stats))  # the student's gate statistics are kept
        assert (teacher - base(ids).logits).abs().max() < 1e-5  # adapters off, gates open: the dense base
        assert (model(ids).logits - adapted).abs().max() == 0  # and everything is back after the view
    assert all(s.forced is None for s in gate_states(model))


def test_lora_run_trains_only_adapters_and_saves_merged_model_and_adapter(tiny_gpt2_dir, tiny_text_file, tmp_path,
                                                                          capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["sparsify", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--out", str(out),
                                    "--lora-rank", "4", "--lr", "1e-2", *FAST], capsys)
    assert code == 0, stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged)  # a plain model's names
    changed = {k for k in base if k in merged and not torch.equal(base[k], merged[k])}
    assert changed and all(".attn.c_attn.weight" in k or ".attn.c_proj.weight" in k for k in changed), changed

    sparse, tok = spartan_cli.load(out)  # every spartan command reads the merged model
    ids = tok("the cat sat on the mat and the dog", return_tensors="pt").input_ids
    dense = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), str(out / "adapter"))
    with torch.no_grad(), gates_open(sparse):  # peft's own loader on the plain base: the merged model, gates open
        assert (sparse(ids).logits - dense(ids).logits).abs().max() < 1e-4


def test_lora_resume_ends_on_the_uninterrupted_weights(tiny_gpt2_dir, tiny_text_file, tmp_path):
    from spartan_cli.training.run import RunConfig, run_sparsify

    def cfg(out):
        return RunConfig.from_dict({
            "model": str(tiny_gpt2_dir), "out": str(out),
            "data": {"source": str(tiny_text_file), "seq_len": 16, "heldout_blocks": 4},
            "train": {"steps": 8, "batch_size": 4, "lr": 1e-2, "eval_every": 0, "checkpoint_every": 0,
                      "lora_rank": 2, "log_every": 1}})

    run_sparsify(cfg(tmp_path / "straight"))
    calls = {"n": 0}

    def stop_after_4():
        calls["n"] += 1
        return calls["n"] > 4

    assert run_sparsify(cfg(tmp_path / "cut"), should_stop=stop_after_4).interrupted
    assert not run_sparsify(cfg(tmp_path / "cut"), resume=True).interrupted
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("extra, message", [
    (["--lora-rank", "2", "--trainable", "attention"], "LoRA trains its adapters only"),
    (["--lora-rank", "2", "--lora-targets", "nope"], "matches no linear layer"),
    (["--lora-targets", "c_attn"], "without train.lora_rank"),
])
def test_bad_lora_options_are_one_line(extra, message, tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    code, _, stderr = run_cli(["sparsify", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--out",
                               str(tmp_path / "r"), *extra, *FAST], capsys)
    assert code == 1 and message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_kl_constraint_with_lora_reads_the_students_dense_view(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    code, stdout, stderr = run_cli(["sparsify", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--out",
                                    str(tmp_path / "r"), "--lora-rank", "2", "--constraint", "kl",
                                    "--geco-reference", "batch", "--tolerance", "0.05", *FAST], capsys)
    assert code == 0, stderr
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["kl"] is not None and r["kl"] >= -1e-6 for r in log)
    assert "loading the dense reference model" not in stderr
    assert GateConfig.from_dict(json.loads((tmp_path / "r" / "spartan.json").read_text())["gate"])
