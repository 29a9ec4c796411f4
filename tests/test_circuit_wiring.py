"""The wired forward: same function as the HF model, per-head sources, and nothing left behind."""

import pytest
import torch

from spartan_cli.gating.attention import attach_gates
from spartan_cli.circuit import Graph, Tap, wired
from spartan_cli.config import GateConfig
from spartan_cli.errors import ModelError
from tests.micro import BUILDERS, VOCAB

ARCHS = sorted(BUILDERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _ids(batch=3, pos=9, seed=1):
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


class _Collect(Tap):
    """Keeps every source output and adds 0 to every destination (forcing the per-copy path)."""

    def __init__(self):
        self.sources, self.slots = {}, []

    def source(self, start, out):
        self.sources[start] = out.clone()
        return out

    def destination(self, start, x):
        self.slots.append(start)
        return x + 0.0


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_wired_forward_reproduces_the_model(arch, gated):
    model = BUILDERS[arch]()
    if gated:
        attach_gates(model, GateConfig(bias=0.0))  # about half the gates shut: they must act the same
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        with wired(model) as wiring:
            plain = wiring.run(ids, attention_mask=mask)
            tap = _Collect()
            split = wiring.run(ids, attention_mask=mask, tap=tap)
    assert (plain - expected).abs().max() <= 1e-5
    assert (split - expected).abs().max() <= 1e-5
    graph = Graph.from_model(model)
    assert sorted(tap.slots) == sorted([graph.head_slot(l) for l in range(2)] + [graph.mlp_slot(l) for l in range(2)]
                                       + [graph.logits_slot])


def test_sources_sum_to_the_residual_stream():
    """GPT-2: the final residual (ln_f's input) = the sum of all sources + the shared output biases."""
    model = BUILDERS["gpt2"]()
    ids = _ids()
    seen = []
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    tap = _Collect()
    with torch.no_grad(), wired(model) as wiring:
        wiring.run(ids, tap=tap)
    total = sum(out.sum(dim=2) for out in tap.sources.values())  # (batch, pos, d_model)
    biases = sum(block.attn.c_proj.bias for block in model.transformer.h)
    assert (total + biases - seen[0]).abs().max() <= 1e-5

@pytest.mark.parametrize("arch", ARCHS)
def test_everything_is_restored_also_on_error(arch):
    model = BUILDERS[arch]().train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    groups = [getattr(m, "num_key_value_groups", None) for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with wired(model):
            assert not model.training
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert [getattr(m, "num_key_value_groups", None) for m in model.modules()] == groups
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    ids = _ids()
    with torch.no_grad():
        model.eval()
        fresh = BUILDERS[arch]()(ids).logits
        assert torch.allclose(model(ids).logits, fresh, atol=1e-6)  # the plain forward is back


def test_gqa_gets_one_k_and_v_input_per_query_head():
    """Llama micro: 4 query heads share 2 KV heads. Patching head 0's k input must leave head 1 (same KV
    head) untouched; the model is never ungrouped by the user."""
    model = BUILDERS["llama"]()
    assert model.config.num_key_value_heads == 2
    graph = Graph.from_model(model)
    k_slot = graph.head_slot(1, 0, "k")

    class PushK(Tap):
        def __init__(self):
            self.heads = None

        def destination(self, start, x):
            if start == graph.head_slot(1):
                x = x.clone()
                x[:, :, k_slot - start] += 1.0
            return x

        def source(self, start, out):
            if start == graph.head_source(1):
                self.heads = out.clone()
            return out

    ids = _ids()
    keep, pushed = _Collect(), PushK()
    with torch.no_grad(), wired(model) as wiring:
        wiring.run(ids, tap=keep)
        wiring.run(ids, tap=pushed)
    changed = (pushed.heads - keep.sources[graph.head_source(1)]).abs().amax(dim=(0, 1, 3))  # (n_heads,)
    assert changed[0] > 1e-4  # head 0 reads the pushed key
    assert changed[1:].max() <= 1e-6  # head 1 shares head 0's KV weights but not its input


def test_graph_of_another_shape_is_refused():
    model = BUILDERS["gpt2"]()
    with pytest.raises(ModelError, match="Graph.from_model"):
        with wired(model, Graph.from_shape(3, 4)):
            pass
    with pytest.raises(ModelError):
        with wired(BUILDERS["neox"](), Graph.from_shape(2, 4)):  # NeoX blocks are parallel
            pass
