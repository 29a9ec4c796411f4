"""CUDA checks (marker `gpu`, skipped without CUDA): parity on the GPU and a bf16 training run."""

import pytest
import torch

from spartan_cli.gating.attention import attach_gates
from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.config import TrainConfig
from spartan_cli.gating.scopes import gates_open
from spartan_cli.training.train import SparsifyConfig, sparsify
from tests.micro import BUILDERS, VOCAB

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_gates_open_parity_on_cuda(arch):
    model = BUILDERS[arch]().to("cuda")
    ids = torch.randint(0, VOCAB, (4, 32), device="cuda")
    with torch.no_grad():
        base = model(ids).logits
        attach_gates(model)
        with gates_open(model):
            gated = model(ids).logits
    assert (gated - base).abs().max().item() <= 1e-4  # TF32 matmuls may differ slightly from fp32 CPU


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_bf16_sparsify_runs_on_cuda_with_fp32_gate_maths(arch):
    model = attach_gates(BUILDERS[arch]()).to("cuda")
    x = torch.randint(0, VOCAB, (64, 32))
    data = Splits(TokenBlocks(x[:48], x[:48].clone()), TokenBlocks(x[48:], x[48:].clone()))
    cfg = SparsifyConfig(train=TrainConfig(steps=20, batch_size=8, lr=1e-3, dtype="bfloat16", eval_every=0))
    result, state = sparsify(model, data, cfg)
    assert result.steps == 20 and torch.isfinite(torch.tensor(result.heldout_ce))
    assert 0.0 <= result.density <= 1.0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
