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


# ---- every attention path on CUDA against the fp32 reference (tests/gpu/run.sh) ----

from types import SimpleNamespace  # noqa: E402

from spartan_cli.config import GateConfig  # noqa: E402
from spartan_cli.gating.attention import ATTENTION_PATHS, GateState, allowed_mask  # noqa: E402


def _path_call(path, device, dtype, *, mode="deterministic", seed=0, chunk_mb=0.01):
    """Output and gradients of one call of ``path`` (batch 2, 4 heads, 300 tokens, d_head 32); row 0
    left-padded by 5 tokens; v (and the output) in ``dtype``, the gate maths fp32 as under autocast."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, generator=g) for _ in range(3))
    q, k = q.to(device).requires_grad_(True), k.to(device).requires_grad_(True)
    v = v.to(device, dtype).requires_grad_(True)
    pad = torch.ones(2, 300, dtype=torch.bool)
    pad[0, :5] = False
    allowed = (allowed_mask(None, 300, 300, "cpu") & pad[:, None, None, :]).to(device)
    forced = torch.tensor([True, False, True, True]) if mode == "forced" else None
    torch.manual_seed(seed)  # the tiled path's seeds come from the default generator when none is given
    state = GateState(cfg=GateConfig(bias=0.5), layer=0, n_heads=4, record=True, forced=forced,
                      stochastic=mode == "sample", chunk_mb=chunk_mb)
    out, _ = ATTENTION_PATHS[path](SimpleNamespace(training=mode == "sample"), state, q, k, v, allowed,
                                   32 ** -0.5, 0.0)
    w = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
    loss = (out.float() * w).sum() + state.stats.density_term.sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.float().cpu(), [t.float().cpu() for t in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["deterministic", "forced"])
@pytest.mark.parametrize("path", ["reference", "fused", "tiled"])
def test_every_path_on_cuda_matches_the_cpu_reference(path, mode, dtype, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref_out, ref_grads = _path_call("reference", "cpu", torch.float32, mode=mode)
    out, grads = _path_call(path, "cuda", dtype, mode=mode)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out - ref_out).abs().max() <= tol
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 10 * tol


def test_tiled_sampled_gates_are_the_same_on_cuda_and_cpu(monkeypatch):
    """Counter-based noise is integer arithmetic: the same seed opens the same gates on either device."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu_out, cpu_grads = _path_call("tiled", "cpu", torch.float32, mode="sample", seed=3)
    cuda_out, cuda_grads = _path_call("tiled", "cuda", torch.float32, mode="sample", seed=3)
    assert (cpu_out - cuda_out).abs().max() <= 1e-4
    for a, b in zip(cpu_grads, cuda_grads):
        assert (a - b).abs().max() <= 1e-3
