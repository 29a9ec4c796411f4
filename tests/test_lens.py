"""TransformerLens interop: ``to_hooked`` gives a HookedTransformer with the same logits as the spartan
model, dense and gated (skipped without transformer-lens 3.x: pip install 'spartan-cli[lens]')."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from spartan_cli import to_hooked  # noqa: E402
from spartan_cli.config import GateConfig  # noqa: E402
from spartan_cli.gating.attention import attach_gates  # noqa: E402
from spartan_cli.gating.scopes import recording  # noqa: E402
from tests.micro import BUILDERS, VOCAB  # noqa: E402

try:
    from transformer_lens import HookedTransformer  # noqa: F401
except ImportError:
    pytest.skip("transformer-lens 4 has no HookedTransformer; install 'transformer-lens<4'", allow_module_level=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dense_logits_match(arch):
    model = BUILDERS[arch]().eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (to_hooked(model)(ids) - model(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gated_logits_match_and_the_hooks_are_the_gates(arch):
    model = attach_gates(BUILDERS[arch](), GateConfig(bias=0.0)).eval()  # about half the gates shut
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    hooked = to_hooked(model)
    with torch.no_grad(), recording(model) as states:
        want = model(ids).logits
        open_pairs = sum(int(s.stats.open_pairs.sum()) for s in states)
        got, cache = hooked.run_with_cache(ids)
    assert (got - want).abs().max() < 1e-4
    dense = to_hooked(BUILDERS[arch]().eval())  # the same weights without gates: different logits
    assert (dense(ids) - want).abs().max() > 1e-3
    n_layers = model.config.num_hidden_layers if arch == "llama" else model.config.n_layer
    seen = sum(int((cache[f"blocks.{l}.attn.hook_pattern"] > 0).sum()) for l in range(n_layers))
    assert seen == open_pairs  # the hooked pattern is nonzero exactly on the open gates
