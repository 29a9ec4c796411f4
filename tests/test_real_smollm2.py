"""The real pretrained SmolLM2-135M (Llama shape, GQA 9/3 heads, 30 layers), offline (marker `real`)."""

import json

import pytest
import torch

from spartan_cli.gating.attention import attach_gates
from spartan_cli.gating.scopes import gates_open
from tests.test_cli_sparsify import run_cli

pytestmark = pytest.mark.real


def test_gates_forced_open_reproduce_smollm2_logits(smollm2_dir, shakespeare_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
    text = (shakespeare_dir / "hamlet.txt").read_text()[20000:26000]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :128].reshape(2, 64)
    with torch.no_grad():
        base = model(ids).logits
        attach_gates(model)
        with gates_open(model):
            gated = model(ids).logits
    assert (gated - base).abs().max().item() <= 1e-4  # 30 layers of fp32 reordering; measured ~1e-5


@pytest.mark.slow
def test_sparsify_smollm2_on_shakespeare_runs(smollm2_dir, shakespeare_dir, tmp_path, capsys):
    code, out, err = run_cli(["sparsify", str(smollm2_dir), "--data", str(shakespeare_dir / "hamlet.txt"),
                              "--seq-len", "128", "--batch-size", "2", "--heldout-blocks", "4", "--steps", "4",
                              "--eval-every", "0", "--out", str(tmp_path / "run"), "--json", "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert 2.5 < summary["base_ce"] < 5.0  # real English loss of a pretrained model on Hamlet
    assert 0.0 < summary["step0_density"] < 1.0
    assert summary["tokens_per_s"] > 0
