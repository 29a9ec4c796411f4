import pytest
import torch

from spartan_cli.attention import attach_gates, gate_states
from spartan_cli.config import GateConfig
from spartan_cli.errors import ModelError
from spartan_cli.gates import gate_kind
from spartan_cli.scopes import gates_open, heads_shut, recording
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
