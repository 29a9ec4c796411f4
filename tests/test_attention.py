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


# ---- the fused and query-chunked paths against the autograd reference ----

from types import SimpleNamespace  # noqa: E402

from spartan_cli.gating import fused as attention_fused  # noqa: E402
from spartan_cli.gating.attention import ATTENTION_PATHS, GateState, allowed_mask, choose_path  # noqa: E402
from spartan_cli.gating.chunked import rows_per_chunk  # noqa: E402

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
    return rows * 4 * B * H * T / 2**20  # makes rows_per_chunk == rows for these shapes


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


@pytest.mark.parametrize("mode", ["sample", "deterministic", "forced_full"])
def test_chunked_path_equals_fused_path_with_the_same_noise(mode, monkeypatch):
    """Query rows in chunks of 3 (of 11), recomputed in the backward: the same values and gradients."""
    fixed = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(9))
    monkeypatch.setattr(attention_fused, "draw_noise", lambda shape, *, generator, device, rows, keys: fixed[:, :, rows, keys].clone())
    forced = torch.rand(B, H, T, T, generator=torch.Generator().manual_seed(5)) > 0.5 if mode == "forced_full" else None
    fused = _run("fused", mode, forced=forced)
    chunked = _run("chunked", mode, forced=forced)
    assert torch.equal(fused[1].open_pairs, chunked[1].open_pairs)
    assert _close(fused[0], chunked[0], 1e-6)
    assert _close(fused[1].density_term, chunked[1].density_term, 1e-6)
    for a, b in zip(fused[2], chunked[2]):
        assert _close(a, b), (a - b).abs().max()


def test_chunked_backward_rewinds_the_generator_to_each_chunks_noise(monkeypatch):
    """Without any substitution: the chunked path draws each chunk's noise from the state's generator and
    its backward regenerates exactly those draws (compared with the fused path fed the same draws)."""
    chunked = _run("chunked", "sample", seed=4)
    gen = torch.Generator().manual_seed(4)
    draws = torch.zeros(B, H, T, T)
    for r0 in range(0, T, CHUNK_ROWS):  # a chunk reads keys up to its last row (causal): that is what it draws
        r1 = min(T, r0 + CHUNK_ROWS)
        draws[:, :, r0:r1, :r1] = torch.rand(B, H, r1 - r0, r1, generator=gen)
    monkeypatch.setattr(attention_fused, "draw_noise", lambda shape, *, generator, device, rows, keys: draws.clone())
    fused = _run("fused", "sample")
    assert torch.equal(fused[1].open_pairs, chunked[1].open_pairs)
    assert _close(fused[0], chunked[0], 1e-6)
    for a, b in zip(fused[2], chunked[2]):
        assert _close(a, b), (a - b).abs().max()


def test_paths_are_chosen_by_size_dropout_and_kind():
    state = GateState(cfg=GateConfig(), layer=0, n_heads=12, chunk_mb=8.0)
    assert choose_path(state, (4, 12, 128), 128) == "fused"  # 3 MiB of scores
    assert choose_path(state, (4, 12, 1024), 1024) == "chunked"  # 192 MiB
    assert choose_path(state, (4, 12, 128), 128, dropout=0.1) == "reference"
    assert rows_per_chunk(torch.empty(4, 12, 1024, 1), torch.empty(4, 12, 1024, 1), 8.0) == 42  # 42 rows: 7.9 MiB
    assert choose_path(GateState(cfg=GateConfig(), layer=0, n_heads=12, chunk_mb=0.001), (1, 1, 4), 4) == "fused"


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_model_matches_plain_model(arch):
    """A whole model (GQA for llama) with every call chunked gives the plain logits, density and gradients."""
    ids = _ids(batch=2, pos=10)
    results = []
    for chunk_mb in (64.0, 4 * 2 * 4 * 10 * 3 / 2**20):  # plain; chunks of 3 query rows
        model = attach_gates(BUILDERS[arch](), GateConfig(bias=0.5), chunk_mb=chunk_mb)
        with recording(model) as states:
            logits = model(ids).logits
            reg = torch.stack([s.stats.density_term.mean() for s in states]).mean()
        (logits.square().mean() + reg).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logits.detach(), reg.detach(), grad))
    (l0, r0, g0), (l1, r1, g1) = results
    assert _close(l0, l1) and _close(r0, r1, 1e-6) and _close(g0, g1, 1e-5)


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_kept_gate_logits_and_pattern_equal_the_reference(path):
    """density and the pictures read g (-inf where a query may not read) and P whole, from every path."""
    q, k, v = _qkv(requires_grad=False)
    kept = []
    for p in ("reference", path):
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
