"""``--method exact`` against leave-one-edge-out patching written here from plain forward hooks.

For every edge u -> v of a 2-layer GPT-2 and a 2-layer Llama, the brute force below runs the clean input
once more with the input of v alone shifted by (a_u on the corrupted input - a_u on the clean input),
which is "every edge clean except u -> v, which carries its corrupted value": nothing upstream of v
changes, so u's clean activation is the one the circuit would have carried. It touches only the Hugging
Face modules (hooks on the blocks, norms, projections); spartan computes the same scores through its
wiring. The score is metric(patched) - metric(clean), the sign convention of every method.
"""

from __future__ import annotations

import pytest
import torch

from spartan_cli.gating.attention import attach_gates
from spartan_cli.circuit import ContrastBatch, Graph, attribute
from spartan_cli.config import GateConfig
from tests.micro import VOCAB, contrast

pytestmark = pytest.mark.usefixtures("one_thread")


# initializer_range 0.3, not 0.02: large enough weights that patching q or k moves the metric well above
# rounding, so a head's q, k and v inputs cannot be confused without the comparison failing
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=24, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                     eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                     initializer_range=0.3)
    return GPT2LMHeadModel(cfg).double().eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    # one key/value head per query head: the hooks below patch one head's k or v input by splicing the
    # projection's output, which a shared (grouped) key/value head would not allow
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3, hidden_size=24,
                      intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, initializer_range=0.3)
    return LlamaForCausalLM(cfg).double().eval()


def _gated(build):
    """The same model with spartan's deterministic gates: a corrupted q or k input also moves the gates."""
    return lambda: attach_gates(build(), GateConfig(bias=0.0))


def logit_difference(logits, batch):
    """Mean over rows of logit(right) - logit(wrong) at each row's last real position (right padding)."""
    rows = torch.arange(logits.shape[0])
    last = batch.attention_mask.sum(dim=1) - 1 if batch.attention_mask is not None else torch.full_like(rows, -1)
    at = logits[rows, last]  # (batch, vocab)
    return (at.gather(1, batch.answers[:, :1]) - at.gather(1, batch.answers[:, 1:])).mean()


def _padded_batch() -> ContrastBatch:
    """Rows of 6, 5 and 4 real tokens, right-padded to 6, their twins corrupted at positions 1 and 3."""
    base = contrast(rows=6, pos=6, seed=3, corrupt=(1, 3))
    mask = torch.ones(6, 6, dtype=torch.long)
    mask[2:4, 5:] = 0
    mask[4:, 4:] = 0
    return ContrastBatch(base.clean * mask, base.corrupted * mask, base.answers, mask)


class Anatomy:
    """Where each node of the graph lives in one Hugging Face architecture."""

    def __init__(self, model):
        self.model = model
        if hasattr(model, "transformer"):  # GPT-2
            self.blocks = list(model.transformer.h)
            self.final_norm = model.transformer.ln_f
            self.attn_norm = [b.ln_1 for b in self.blocks]
            self.mlp_norm = [b.ln_2 for b in self.blocks]
            self.out_proj = [b.attn.c_proj for b in self.blocks]
            self.mlps = [b.mlp for b in self.blocks]
            self.n_heads = model.config.n_head
        else:  # Llama
            self.blocks = list(model.model.layers)
            self.final_norm = model.model.norm
            self.attn_norm = [b.input_layernorm for b in self.blocks]
            self.mlp_norm = [b.post_attention_layernorm for b in self.blocks]
            self.out_proj = [b.self_attn.o_proj for b in self.blocks]
            self.mlps = [b.mlp for b in self.blocks]
            self.n_heads = model.config.num_attention_heads
        self.d_model = model.config.hidden_size
        self.d_head = self.d_model // self.n_heads

    def head_output(self, layer: int, z: torch.Tensor, head: int) -> torch.Tensor:
        """What head ``head`` writes to the residual stream, from the out-projection's input z (no bias)."""
        proj = self.out_proj[layer]
        cols = slice(head * self.d_head, (head + 1) * self.d_head)
        if hasattr(self.model, "transformer"):  # Conv1D: weight (in, out)
            return z[..., cols] @ proj.weight[cols, :]
        return z[..., cols] @ proj.weight[:, cols].T

    def qkv_splice(self, layer: int, qkv: str, head: int):
        """(module, columns) whose output columns are head ``head``'s q, k or v, computed from the
        attention norm's output."""
        cols = lambda offset: slice(offset + head * self.d_head, offset + (head + 1) * self.d_head)
        block = self.blocks[layer]
        if hasattr(self.model, "transformer"):
            return block.attn.c_attn, cols("qkv".index(qkv) * self.d_model)
        return getattr(block.self_attn, f"{qkv}_proj"), cols(0)


def _activations(model, anatomy: Anatomy, ids: torch.Tensor, mask) -> list[torch.Tensor]:
    """Every source's output in graph order: input, then per layer each head, then the MLP."""
    found: dict = {}
    handles = [anatomy.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: found.__setitem__("input", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True)]
    for layer in range(len(anatomy.blocks)):
        handles.append(anatomy.out_proj[layer].register_forward_pre_hook(
            lambda m, args, layer=layer: found.__setitem__(("z", layer), args[0].clone())))
        handles.append(anatomy.mlps[layer].register_forward_hook(
            lambda m, args, out, layer=layer: found.__setitem__(("m", layer), out.clone())))
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    acts = [found["input"]]
    for layer in range(len(anatomy.blocks)):
        acts += [anatomy.head_output(layer, found[("z", layer)], h) for h in range(anatomy.n_heads)]
        acts.append(found[("m", layer)])
    return acts


def _patched_logits(model, anatomy: Anatomy, ids: torch.Tensor, mask, slot: tuple, shift: torch.Tensor):
    """The clean forward with the input of one destination alone moved by ``shift``."""
    kind = slot[0]
    handles = []
    if kind == "logits":
        norm = anatomy.final_norm
        handles.append(norm.register_forward_hook(lambda m, args, out: m.forward(args[0] + shift)))
    elif kind == "mlp":
        norm = anatomy.mlp_norm[slot[1]]
        handles.append(norm.register_forward_hook(lambda m, args, out: m.forward(args[0] + shift)))
    else:  # ("head", layer, head, qkv): only this head's q, k or v reads the shifted residual
        _, layer, head, qkv = slot
        resid = {}
        handles.append(anatomy.blocks[layer].register_forward_pre_hook(
            lambda m, args, kwargs: resid.__setitem__("x", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
        proj, cols = anatomy.qkv_splice(layer, qkv, head)
        norm = anatomy.attn_norm[layer]

        def splice(m, args, out):
            moved = m.forward(norm.forward(resid["x"] + shift))
            out = out.clone()
            out[..., cols] = moved[..., cols]
            return out

        handles.append(proj.register_forward_hook(splice))
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()


def _brute_force_scores(model, batch, graph: Graph) -> torch.Tensor:
    anatomy = Anatomy(model)
    mask = batch.attention_mask
    clean_acts = _activations(model, anatomy, batch.clean, mask)
    corrupted_acts = _activations(model, anatomy, batch.corrupted, mask)
    with torch.no_grad():
        clean_metric = float(logit_difference(model(batch.clean, attention_mask=mask).logits, batch))
    slots = []
    for layer in range(graph.n_layers):
        slots += [("head", layer, h, qkv) for qkv in "qkv" for h in range(graph.n_heads)] + [("mlp", layer)]
    slots.append(("logits",))
    scores = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
    for f, b in torch.nonzero(graph.real).tolist():
        shift = corrupted_acts[f] - clean_acts[f]
        logits = _patched_logits(model, anatomy, batch.clean, mask, slots[b], shift)
        scores[f, b] = float(logit_difference(logits, batch)) - clean_metric
    return scores


def _edge_kind(graph: Graph, slot: int) -> str:
    name = graph.slot_names[slot]
    return name[-2] if name.endswith(">") else ("logits" if name == "logits" else "mlp")


@pytest.mark.parametrize("build", [_gpt2, _llama, _gated(_gpt2), _gated(_llama)],
                         ids=["gpt2", "llama", "gpt2-gated", "llama-gated"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_exact_scores_equal_leave_one_edge_out_patching_for_every_edge_type(build, padded):
    model = build()
    batch = _padded_batch() if padded else contrast(rows=4, pos=6, seed=3, corrupt=(1, 3))
    spartan = attribute(model, [batch], metric=logit_difference, method="exact")
    brute = _brute_force_scores(model, batch, spartan)
    real = spartan.real
    kinds = {_edge_kind(spartan, b) for b in range(spartan.n_backward)}
    assert kinds == {"q", "k", "v", "mlp", "logits"}
    largest = float(brute[real].abs().max())
    assert largest > 0.1  # patching moves the metric: the comparison has something to compare
    for b in range(spartan.n_backward):
        f = real[:, b]
        got, want = spartan.scores[f, b].double(), brute[f, b]
        assert torch.allclose(got, want, atol=1e-5 * largest, rtol=1e-4), (
            f"{spartan.slot_names[b]} ({_edge_kind(spartan, b)} edges): spartan {got.tolist()} vs "
            f"brute force {want.tolist()}")
