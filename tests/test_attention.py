import pytest
import torch

from spartan_cli.gating.attention import attach_gates, gate_states
from spartan_cli.config import GateConfig
from spartan_cli.errors import ModelError
from spartan_cli.gating.gates import gate_kind
from spartan_cli.gating.scopes import gates_open, heads_shut, recording
from tests.micro import BUILDERS, OUT_PROJ, VOCAB

ARCHS = sorted(BUILDERS)


def _ids(batch=3, pos=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, pos), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_gates_forced_open_reproduce_base_logits(arch):
    model = BUILDERS[arch]()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        attach_gates(model, GateConfig(bias=-5.0))  # a bias that shuts most gates: forcing must override it
        with gates_open(model):
            gated = model(ids).logits
        sparse = model(ids).logits
    assert (gated - base).abs().max().item() <= 1e-5
    assert (sparse - base).abs().max().item() > 1e-3  # the gates really act when not forced


@pytest.mark.parametrize("arch", ARCHS)
def test_head_gated_shut_equals_head_ablated_by_hand(arch):
    model = BUILDERS[arch]()
    n_heads = model.config.num_attention_heads
    d_head = model.config.hidden_size // n_heads
    layer, head = 1, 2
    ids = _ids()

    def zero_head(_module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0.0
        return (x,)

    with torch.no_grad():
        hook = OUT_PROJ[arch](model, layer).register_forward_pre_hook(zero_head)
        try:
            ablated = model(ids).logits
        finally:
            hook.remove()
        attach_gates(model)
        with heads_shut(model, {layer: [head]}):
            shut = model(ids).logits
        with gates_open(model):
            dense = model(ids).logits
    assert (shut - ablated).abs().max().item() <= 1e-5
    assert (shut - dense).abs().max().item() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_is_respected(arch):
    """Left-padded rows give the same logits at real positions as the rows alone, and pads count no pairs."""
    model = attach_gates(BUILDERS[arch](), GateConfig(bias=0.5))
    ids = _ids(batch=2, pos=10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0: 4 pad tokens on the left
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # absolute positions (GPT-2) must skip the pads too
    with torch.no_grad(), recording(model) as states:
        padded = model(ids, attention_mask=mask, position_ids=positions).logits
        allowed = states[0].stats.allowed_pairs[:, 0]
        alone = model(ids[:1, 4:]).logits
        alone_allowed = states[0].stats.allowed_pairs[0, 0]
    assert (padded[0, 4:] - alone[0]).abs().max().item() <= 1e-5
    assert allowed[1].item() == 10 * 11 / 2
    assert allowed[0].item() == alone_allowed.item() == 6 * 7 / 2


def test_all_gates_shut_outputs_zero_without_nan():
    model = attach_gates(BUILDERS["gpt2"]())
    captured = []
    hook = model.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad(), heads_shut(model, {0: [0, 1, 2, 3]}):
        out = model(_ids()).logits
    hook.remove()
    assert torch.isfinite(out).all()
    assert captured[0].abs().max().item() == 0.0


def test_sampled_gates_are_bernoulli_of_sigmoid():
    kind = gate_kind("paper")
    g = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    freq = kind.sample(g, generator=gen).mean(0)
    assert torch.allclose(freq, torch.sigmoid(g[0]), atol=0.01)


def test_straight_through_gradient_reaches_query_and_key_weights():
    model = attach_gates(BUILDERS["gpt2"]())
    model.train()
    with recording(model) as states:
        model(_ids())
        reg = torch.stack([s.stats.density_term.mean() for s in states]).mean()
    reg.backward()
    grad = model.transformer.h[-1].attn.c_attn.weight.grad  # last layer; columns: q | k | v
    d = model.config.n_embd
    assert grad[:, : 2 * d].abs().sum() > 0  # q and k move the gate logits
    assert grad[:, 2 * d:].abs().sum() == 0  # v does not enter the density term


def test_training_mode_samples_gates_eval_mode_is_deterministic():
    model = attach_gates(BUILDERS["gpt2"](), GateConfig(bias=0.0))
    ids = _ids()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        model.train()
        c, d = model(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


def test_gate_states_restored_after_scope_error():
    model = attach_gates(BUILDERS["gpt2"]())
    with pytest.raises(RuntimeError):
        with gates_open(model):
            raise RuntimeError("boom")
    assert all(s.forced is None for s in gate_states(model))


def test_unsupported_architecture_names_supported_ones():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelError, match="supported: .*gpt2.*llama"):
        attach_gates(model)


# ---- the fused and tiled paths against the autograd reference ----

from types import SimpleNamespace  # noqa: E402

from spartan_cli.gating import fused as attention_fused  # noqa: E402
from spartan_cli.gating.attention import ATTENTION_PATHS, GateState, allowed_mask, choose_path  # noqa: E402
from spartan_cli.gating import tiled as attention_tiled  # noqa: E402

B, H, T, D = 2, 3, 11, 4
CHUNK_ROWS = 3


def _qkv(seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _padded_allowed():
    """Causal, and row 0 left-padded by 3 tokens: its first 3 query rows may read nothing at all."""
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[0, :3] = False
    causal = allowed_mask(None, T, T, "cpu")
    return causal & pad[:, None, None, :]  # (batch, 1, q, k)


def _chunk_mb(rows=CHUNK_ROWS):
    return rows * 4 * B * H * T / 2**20  # the fp32 scores of ``rows`` query rows over all T keys


def _run(path, mode, *, seed=0, chunk_rows=CHUNK_ROWS, allowed=None, forced=None):
    """Output, stats and gradients of one call of ``path``; the loss weights output and density term."""
    q, k, v = _qkv()
    allowed = _padded_allowed() if allowed is None else allowed
    state = GateState(cfg=GateConfig(bias=0.3), layer=0, n_heads=H, record=True, stochastic=mode == "sample",
                      forced=forced, generator=torch.Generator().manual_seed(seed), chunk_mb=_chunk_mb(chunk_rows))
    module = SimpleNamespace(training=mode == "sample")
    out, _ = ATTENTION_PATHS[path](module, state, q, k, v, allowed, D ** -0.5, 0.0)  # (batch, q, heads, d)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * w).sum() + (state.stats.density_term * torch.arange(1.0, 1 + B * H).view(B, H)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), state.stats, grads


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("block_rows", [64, 4])
@pytest.mark.parametrize("mode", ["sample", "deterministic", "forced_head", "forced_full"])
def test_fused_path_equals_autograd_reference(mode, block_rows, monkeypatch):
    """Blocks of 4 query rows read keys only up to their last row: the same results as whole rows."""
    monkeypatch.setattr(attention_fused, "BLOCK_ROWS", block_rows)
    forced = None
    if mode == "forced_head":
        forced = torch.tensor([True, False, True])
    elif mode == "forced_full":
        forced = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(5)) > 0.5
    run_mode = "sample" if mode == "sample" else "deterministic"
    ref = _run("reference", run_mode, forced=forced)
    fused = _run("fused", run_mode, forced=forced)
    assert torch.equal(ref[1].open_pairs, fused[1].open_pairs)
    assert torch.equal(ref[1].allowed_pairs, fused[1].allowed_pairs)
    assert _close(ref[0], fused[0], 1e-6)  # same noise bits, same gates, same outputs
    assert _close(ref[1].density_term, fused[1].density_term, 1e-6)
    for a, b in zip(ref[2], fused[2]):
        assert _close(a, b), (a - b).abs().max()
    assert torch.isfinite(fused[0]).all() and fused[0][0, :3].abs().max() == 0.0  # rows that may read nothing


def _fixed_noise(monkeypatch, seed=9):
    """The fused and tiled paths both fed the same U(0, 1) draws for every (q, k) pair."""
    fixed = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(seed))
    monkeypatch.setattr(attention_fused, "draw_noise", lambda shape, *, generator, device, rows, keys: fixed[:, :, rows, keys].clone())
    monkeypatch.setattr(attention_tiled, "tile_noise", lambda seeds, n_heads, rows, keys: fixed[:, :, rows, keys].clone())


@pytest.mark.parametrize("tile_pairs", [1, 6, 33, 121])
@pytest.mark.parametrize("mode", ["sample", "deterministic", "forced_head", "forced_full"])
def test_tiled_path_equals_fused_path_with_the_same_noise(mode, tile_pairs, monkeypatch):
    """Tiles of 1x1 up to the whole 11x11 (33 pairs: 5 query rows x 6 keys, straddling the padding and the
    diagonal), recomputed in the backward with the softmax denominator over every key: the same values and
    gradients as the fused path, padded rows that read nothing included."""
    _fixed_noise(monkeypatch)
    forced = None
    if mode == "forced_head":
        forced = torch.tensor([True, False, True])
    elif mode == "forced_full":
        forced = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(5)) > 0.5
    run_mode = "sample" if mode == "sample" else "deterministic"
    fused = _run("fused", run_mode, forced=forced)
    tiled = _run("tiled", run_mode, forced=forced, chunk_rows=tile_pairs / T)
    assert torch.equal(fused[1].open_pairs, tiled[1].open_pairs)
    assert torch.equal(fused[1].allowed_pairs, tiled[1].allowed_pairs)
    assert _close(fused[0], tiled[0], 1e-6)
    assert _close(fused[1].density_term, tiled[1].density_term, 1e-6)
    for a, b in zip(fused[2], tiled[2]):
        assert _close(a, b), (a - b).abs().max()
    assert torch.isfinite(tiled[0]).all() and tiled[0][0, :3].abs().max() == 0.0


@pytest.mark.parametrize("path", ["fused", "tiled"])
def test_bf16_values_match_the_fp32_reference(path):
    """Under bf16 autocast v arrives in bf16 while the gate maths stays fp32: outputs and gradients within
    bf16 rounding of the fp32 reference."""
    results = []
    for p, dtype in (("reference", torch.float32), (path, torch.bfloat16)):
        q, k, v = _qkv(requires_grad=False)
        v = v.to(dtype).requires_grad_(True)
        q.requires_grad_(True), k.requires_grad_(True)
        state = GateState(cfg=GateConfig(bias=0.3), layer=0, n_heads=H, record=True, chunk_mb=_chunk_mb(1))
        out, _ = ATTENTION_PATHS[p](SimpleNamespace(training=False), state, q, k, v, _padded_allowed(), D ** -0.5, 0.0)
        assert out.dtype == dtype
        loss = (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + state.stats.density_term.sum()
        results.append((out.float().detach(), [g.float() for g in torch.autograd.grad(loss, (q, k, v))]))
    (o0, g0), (o1, g1) = results
    assert _close(o0, o1, 3e-2)
    assert all(_close(a, b, 5e-2) for a, b in zip(g0, g1))


def test_tile_shapes_follow_the_memory_budget():
    assert attention_tiled.tile_shape(torch.empty(2, 3, 11, 4), torch.empty(2, 3, 11, 4), _chunk_mb(33 / T)) == (5, 6)
    rows, keys = attention_tiled.tile_shape(torch.empty(4, 12, 4096, 1), torch.empty(4, 12, 4096, 1), 8.0)
    assert 4 * 4 * 12 * rows * keys <= 8 * 2**20 and rows == 209  # square-ish, whatever T is
    assert attention_tiled.tile_shape(torch.empty(1, 1, 1, 4), torch.empty(1, 1, 4096, 4), 64.0) == (1, 4096)


def test_tiled_sampled_gates_do_not_depend_on_the_tiling():
    """Counter-based noise: a pair's draw depends on (seed, head, query, key) only, so any tiling opens the
    same gates and its backward (which draws again) gives the same gradients."""
    runs = [_run("tiled", "sample", seed=4, chunk_rows=pairs / T) for pairs in (1, 7, 40, 121)]
    for other in runs[1:]:
        assert _close(runs[0][0], other[0], 1e-6)  # the output is that of the sampled gates
        for a, b in zip(runs[0][2], other[2]):
            assert _close(a, b), (a - b).abs().max()
    assert (runs[0][0] - _run("tiled", "sample", seed=5)[0]).abs().max() > 0.1  # the seed matters


def test_tiled_noise_is_uniform_and_gates_open_with_probability_sigmoid_g():
    seeds = torch.tensor([3, 4])
    u = attention_tiled.tile_noise(seeds, 4, slice(0, 256), slice(0, 256))  # (2, 4, 256, 256)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 2e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max() < 2e-3  # flat
    assert abs(torch.corrcoef(torch.stack([u[0].flatten(), u[1].flatten()]))[0, 1].item()) < 0.01  # seeds differ
    assert abs(torch.corrcoef(torch.stack([u[0, 0, :, :-1].flatten(), u[0, 0, :, 1:].flatten()]))[0, 1].item()) < 0.01
    torch.testing.assert_close(u[:, :, 10:20, 30:50], attention_tiled.tile_noise(seeds, 4, slice(10, 20), slice(30, 50)))
    for g in (-2.0, 0.0, 1.5):  # M = 1[g + log u - log(1 - u) > 0] ~ Bernoulli(sigmoid(g))
        opened = ((g + u.log() - (-u).log1p()) > 0).float().mean().item()
        assert abs(opened - torch.sigmoid(torch.tensor(g)).item()) < 3e-3


def test_tiled_causal_path_builds_no_q_by_k_tensor():
    """Without a mask (causal, KV-cache offset included) the tiled path makes its masks tile by tile: the same
    results as with the full causal mask, and autograd keeps nothing with q x k elements."""
    q_len, k_len = 20, 32  # 20 new queries after 12 cached keys
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for n in (q_len, k_len, k_len))
    gating = attention_fused.Gating(bias=0.3, sample=False, record=True)
    results = []
    for allowed in (allowed_mask(None, q_len, k_len, "cpu"), None):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out, density, side = attention_tiled.tiled_attention(q, k, v, allowed, 0.5, gating, tile=(6, 7))
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + density.sum()
        results.append((out.detach(), density.detach(), side["open_pairs"], torch.autograd.grad(loss, (q, k, v))))
        # with the mask, the mask itself is kept (q x k); without, the largest kept tensor is k or v (1, 2, 32, 4)
        assert (max(sizes) >= q_len * k_len) == (allowed is not None), sizes
    (o0, d0, n0, g0), (o1, d1, n1, g1) = results
    assert torch.equal(n0, n1) and _close(o0, o1, 1e-6) and _close(d0, d1, 1e-6)
    assert all(_close(a, b, 1e-6) for a, b in zip(g0, g1))


def test_paths_are_chosen_by_size_dropout_kind_and_kept_tensors():
    state = GateState(cfg=GateConfig(), layer=0, n_heads=12, chunk_mb=8.0)
    assert choose_path(state, (4, 12, 128), 128) == "fused"  # 3 MiB of scores
    assert choose_path(state, (4, 12, 1024), 1024) == "tiled"  # 192 MiB
    assert choose_path(state, (4, 12, 128), 128, dropout=0.1) == "reference"
    assert choose_path(GateState(cfg=GateConfig(), layer=0, n_heads=12, chunk_mb=0.001), (1, 1, 4), 4) == "fused"
    kept = GateState(cfg=GateConfig(), layer=0, n_heads=12, chunk_mb=8.0, keep_gate_logits=True)
    assert choose_path(kept, (4, 12, 1024), 1024) == "fused"  # whole g is q x k anyway


@pytest.mark.parametrize("arch", ARCHS)
def test_tiled_model_matches_plain_model(arch):
    """A whole model (GQA for llama) with every call tiled gives the fused logits, density and gradients."""
    ids = _ids(batch=2, pos=10)
    results = []
    for chunk_mb in (64.0, 4 * 2 * 4 * 12 / 2**20):  # fused; tiles of 3 query rows x 4 keys
        model = attach_gates(BUILDERS[arch](), GateConfig(bias=0.5), chunk_mb=chunk_mb)
        with recording(model) as states:
            logits = model(ids).logits
            reg = torch.stack([s.stats.density_term.mean() for s in states]).mean()
        (logits.square().mean() + reg).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logits.detach(), reg.detach(), grad))
    (l0, r0, g0), (l1, r1, g1) = results
    assert _close(l0, l1) and _close(r0, r1, 1e-6) and _close(g0, g1, 1e-5)


def test_kept_gate_logits_and_pattern_equal_the_reference():
    """density and the pictures read g (-inf where a query may not read) and P whole, from the fused path."""
    q, k, v = _qkv(requires_grad=False)
    kept = []
    for p in ("reference", "fused"):
        state = GateState(cfg=GateConfig(bias=0.3), layer=0, n_heads=H, keep_gate_logits=True, keep_pattern=True,
                          chunk_mb=_chunk_mb())
        ATTENTION_PATHS[p](SimpleNamespace(training=False), state, q, k, v, _padded_allowed(), D ** -0.5, 0.0)
        kept.append((state.gate_logits, state.pattern))
    (g0, p0), (g1, p1) = kept
    assert g1.shape == (B, H, T, T) and torch.equal(torch.isinf(g0), torch.isinf(g1))
    assert _close(g0[torch.isfinite(g0)], g1[torch.isfinite(g1)], 1e-6)
    assert _close(p0, p1, 1e-6)


@pytest.mark.slow
def test_training_with_a_fixed_seed_matches_the_autograd_reference(monkeypatch):
    """Six GECO steps (sampled gates, density term, AdamW) end on the same weights, up to float error,
    whether attention runs the fused path or the autograd reference: the same noise, the same maths."""
    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import TrainConfig
    from spartan_cli.training.train import SparsifyConfig, sparsify

    x = torch.randint(0, VOCAB, (12, 16), generator=torch.Generator().manual_seed(0))
    data = Splits(TokenBlocks(x[:8], x[:8].clone()), TokenBlocks(x[8:], x[8:].clone()))
    cfg = SparsifyConfig(gate=GateConfig(bias=0.5), train=TrainConfig(steps=6, batch_size=4, lr=1e-3, lr_warmup_steps=0,
                                                                      eval_every=0, checkpoint_every=0, device="cpu"))
    finals = []
    for path in ("fused", "reference"):
        with monkeypatch.context() as m:
            m.setitem(ATTENTION_PATHS, "fused", ATTENTION_PATHS[path])
            model = attach_gates(BUILDERS["gpt2"]())
            result, _ = sparsify(model, data, cfg)
        finals.append((torch.cat([p.detach().flatten() for p in model.parameters()]), result))
    (w0, r0), (w1, r1) = finals
    assert (w0 - w1).abs().max().item() <= 1e-5
    assert r0.density == r1.density and abs(r0.heldout_ce - r1.heldout_ce) <= 1e-5
    assert (w0 - torch.cat([p.flatten() for p in BUILDERS["gpt2"]().parameters()])).abs().max() > 1e-4  # it trained
