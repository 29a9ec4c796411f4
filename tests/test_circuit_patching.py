"""Attribution against exact edge patching, and edge-patching evaluation, on 2-layer micro models."""

import math

import pytest
import torch

from spartan_cli.gating.attention import attach_gates
from spartan_cli.circuit import (Curve, CurvePoint, Graph, Tap, attribute, evaluate, faithfulness, select, sweep,
                                 wired)
from spartan_cli.circuit.taps import Patch, Record
from spartan_cli.config import GateConfig
from spartan_cli.errors import ConfigError
from tests.micro import BUILDERS, contrast, logit_difference

ARCHS = sorted(BUILDERS)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs"])
def test_attribution_ranks_edges_like_exact_patching(method):
    """Spearman rank correlation of signed scores with exact single-edge patching, every edge of a
    2-layer GPT-2 (110 edges). Measured: EAP 0.986, EAP-IG(5) 0.985."""
    model = BUILDERS["gpt2"]()
    data = [contrast()]
    scores = attribute(model, data, metric=logit_difference, method=method)
    exact = attribute(model, data, metric=logit_difference, method="exact")  # one patched run per edge
    real = exact.real
    assert real.sum() == 110
    assert _spearman(scores.scores[real], exact.scores[real]) >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_eap_is_the_derivative_of_edge_patching(arch):
    """For each of the top edges, the EAP score equals d/d eps of the metric when eps * delta is patched
    into that edge alone (central difference, float64). This checks every gradient path, GQA included."""
    model = BUILDERS[arch]().double()
    batch = contrast(rows=4)
    graph = attribute(model, [batch], metric=logit_difference, method="eap")
    eps = 3e-2  # Llama's RMSNorm computes in float32: a small eps would drown in its rounding
    with torch.no_grad(), wired(model, graph) as wiring:
        corrupted = torch.zeros(graph.n_forward, 4, 8, model.config.hidden_size, dtype=torch.float64)
        wiring.run(batch.corrupted, tap=Record(corrupted))
        for edge in graph.top_edges(6, in_graph_only=False):
            f, b = graph.edge_index(edge.name)
            values = []
            for sign in (1, -1):
                weight = torch.zeros(graph.n_forward, graph.n_backward, dtype=torch.float64)
                weight[f, b] = sign * eps
                logits = wiring.run(batch.clean, tap=Patch(graph, corrupted.clone(), weight))
                values.append(float(logit_difference(logits, batch)))
            derivative = (values[0] - values[1]) / (2 * eps)
            assert derivative == pytest.approx(edge.score, rel=3e-2, abs=1e-3 * abs(edge.score)), edge.name


@pytest.mark.parametrize("arch", ARCHS)
def test_full_circuit_is_clean_and_empty_circuit_is_corrupted(arch):
    model = BUILDERS[arch]()
    batch = contrast()
    graph = Graph.from_model(model)
    empty = graph.with_circuit(torch.zeros_like(graph.real))
    result = evaluate(model, [batch], metric=logit_difference, circuits=[graph, empty])
    with torch.no_grad():
        clean = float(logit_difference(model(batch.clean).logits, batch))
        corrupted = float(logit_difference(model(batch.corrupted).logits, batch))
    assert result.clean == pytest.approx(clean, abs=1e-5)
    assert result.corrupted == pytest.approx(corrupted, abs=1e-5)
    assert abs(clean - corrupted) > 1e-3  # the two baselines really differ
    assert result.metrics[0] == pytest.approx(clean, abs=1e-5)
    assert result.metrics[1] == pytest.approx(corrupted, abs=1e-5)
    assert result.faithfulness(result.metrics[0]) == pytest.approx(1.0, abs=1e-3)
    assert result.faithfulness(result.metrics[1]) == pytest.approx(0.0, abs=1e-3)


def test_gated_model_uses_deterministic_gates_and_restores_training_mode():
    model = attach_gates(BUILDERS["gpt2"](), GateConfig(bias=0.0)).train()  # training mode samples gates
    batch = contrast()
    first = attribute(model, [batch], metric=logit_difference, method="eap")
    second = attribute(model, [batch], metric=logit_difference, method="eap")
    assert torch.equal(first.scores, second.scores)  # no sampling noise
    assert model.training  # restored
    graph = Graph.from_model(model)
    result = evaluate(model, [batch], metric=logit_difference, circuits=[graph])
    model.eval()
    with torch.no_grad():
        clean = float(logit_difference(model(batch.clean).logits, batch))  # eval = deterministic gates
    assert result.metrics[0] == pytest.approx(clean, abs=1e-5) == result.clean


def test_chunking_and_ig_steps_do_not_change_the_maths():
    model = BUILDERS["llama"]()
    batches = [contrast(rows=6, seed=0), contrast(rows=3, seed=1)]
    whole = attribute(model, batches, metric=logit_difference, method="eap")
    tiny = attribute(model, batches, metric=logit_difference, method="eap", max_delta_mb=1e-6)  # one row per chunk
    assert torch.allclose(whole.scores, tiny.scores, atol=1e-6)
    one_step = attribute(model, batches, metric=logit_difference, method="eap-ig-inputs", ig_steps=1)
    assert torch.allclose(whole.scores, one_step.scores, atol=1e-7)
    assert whole.meta["n_examples"] == 9


def test_sweep_finds_a_faithful_circuit():
    model = BUILDERS["gpt2"]()
    data = [contrast()]
    graph = attribute(model, data, metric=logit_difference, method="eap-ig-inputs")
    curve = sweep(model, data, metric=logit_difference, graph=graph, sizes=[0, 5, 20, 60, graph.n_real_edges])
    assert curve.points[0].edges == 0 and curve.points[0].faithfulness == pytest.approx(0.0, abs=1e-3)
    assert curve.points[-1].edges == 110 and curve.points[-1].faithfulness == pytest.approx(1.0, abs=1e-3)
    needed = curve.edges_needed(0.9)
    assert needed is not None and needed <= 110
    point = curve.point_for(0.9)
    assert select(graph, point.requested).n_edges == needed
    assert Curve.from_dict(curve.to_dict()) == curve


def test_curve_reading_uses_the_running_maximum_and_mib_areas():
    pts = tuple(CurvePoint(n, e, 0, 0.0, f) for n, e, f in
                [(1, 1, 0.2), (2, 2, 0.95), (5, 4, 0.7), (10, 8, 0.92), (100, 100, 1.0)])
    curve = Curve(pts, clean=1.0, corrupted=0.0, total_edges=100, selection="topn")
    assert curve.edges_needed(0.9) == 2  # F dips after 2 edges, but 2 edges already reached it
    assert curve.point_for(0.9).requested == 2 and curve.point_for(0.96).edges == 100
    assert curve.edges_needed(0.99) == 100
    assert curve.edges_needed(1.5) is None
    flat = Curve(tuple(CurvePoint(n, n, 0, 0.0, 1.0) for n in (10, 100)), 1.0, 0.0, 100, "topn")
    assert flat.cpr() == pytest.approx(0.9) and flat.cmd() == pytest.approx(0.0)
    assert faithfulness(0.5, clean=2.0, corrupted=0.0) == 0.25
    assert math.isnan(faithfulness(1.0, clean=1.0, corrupted=1.0))


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatched_gradient_run_gives_every_copy_its_own_gradient(arch):
    """A watched run that patches nothing norms the residual once (wiring's one-stream path); the gradient at
    every slot and at the input must equal that of the per-copy path, taken when the tap hands back a copy."""
    model = BUILDERS[arch]().double()
    batch = contrast(rows=3)

    def gradients(copy: bool):
        grads = {}

        class Watch(Tap):
            def source(self, start, out):
                if start == 0:
                    out = out.detach().requires_grad_(True)
                    out.register_hook(lambda g: grads.__setitem__("input", g))
                return out

            def destination(self, start, x):
                x.register_hook(lambda g: grads.__setitem__(start, g.contiguous()))
                return x.clone() if copy else x

        with wired(model) as wiring:
            logit_difference(wiring.run(batch.clean, tap=Watch()), batch).backward()
        return grads

    one_stream, per_copy = gradients(False), gradients(True)
    assert one_stream.keys() == per_copy.keys() and len(one_stream) == 2 * 2 + 2  # 2 layers x (qkv, mlp), logits, input
    for key, g in per_copy.items():
        assert g.abs().sum() > 0, key
        torch.testing.assert_close(one_stream[key], g, rtol=1e-10, atol=1e-12)


def test_straight_through_gates_keep_the_forward_and_pass_the_sigmoid_gradient():
    """gate_gradient="straight-through": a gated layer's output keeps its value bit for bit, and its gradient
    is that of A = P * (1[g > 0] + s - s.detach()), s = sigmoid(g), written out by hand."""
    from spartan_cli.gating.attention import STATE_ATTR, gated_attention_forward
    from spartan_cli.circuit.taps import GATE_GRADIENTS, Gradients
    from spartan_cli.hf.models import adapter_for

    model = attach_gates(BUILDERS["gpt2"](), GateConfig(bias=0.0)).double()
    module = adapter_for(model).attention_modules(model)[0]
    bias = getattr(module, STATE_ATTR).cfg.bias
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    up = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64)  # dM/dz, (batch, pos, n_heads, d_head)

    z = gated_attention_forward(module, q, k, v, None, scaling=0.3)[0]
    z_st = z + GATE_GRADIENTS["straight-through"](module, q, k, v, None, 0.3)
    assert torch.equal(z_st, z)
    scores = q @ k.transpose(-1, -2) * 0.3  # by hand: (batch, n_heads, q, k)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, -torch.inf).softmax(-1)
    soft = torch.sigmoid(scores + bias)
    gates = ((scores + bias) > 0).double() + soft - soft.detach()
    z_hand = ((pattern * gates * causal) @ v).transpose(1, 2)
    torch.testing.assert_close(z_st, z_hand, rtol=1e-5, atol=1e-6)  # the gate maths runs in fp32
    hard_q = torch.autograd.grad(z, q, up, retain_graph=True)[0]
    mine, hand = torch.autograd.grad(z_st, (q, k, v), up), torch.autograd.grad(z_hand, (q, k, v), up)
    for a, b in zip(mine, hand):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hard_q, mine[0])  # the hard gates alone pass a different gradient

    batch = contrast(rows=3)  # whole model: the attribution run's logits are the model's own
    graph = Graph.from_model(model)
    delta = torch.zeros(graph.n_forward, 3, 8, 32, dtype=torch.float64)
    scores_buf = torch.zeros(graph.n_forward, graph.n_backward)
    with wired(model, graph) as wiring:
        plain = wiring.run(batch.clean)
        tap = Gradients(graph, delta, scores_buf, subtract=False, gate_term=GATE_GRADIENTS["straight-through"])
        assert torch.equal(wiring.run(batch.clean, tap=tap).detach(), plain)


def test_gate_gradient_changes_only_gated_models():
    batch = [contrast(rows=4)]
    dense = BUILDERS["gpt2"]()
    hard, st = (attribute(dense, batch, metric=logit_difference, method="eap", gate_gradient=gg)
                for gg in ("hard", "straight-through"))
    assert torch.equal(hard.scores, st.scores) and hard.meta["gate_gradient"] is None
    gated = attach_gates(BUILDERS["gpt2"](), GateConfig(bias=0.0))
    hard, st = (attribute(gated, batch, metric=logit_difference, method="eap", gate_gradient=gg)
                for gg in ("hard", "straight-through"))
    assert (hard.scores != st.scores).any() and st.meta["gate_gradient"] == "straight-through"
    logits_slot = hard.scores[:, -1]  # nothing lies between the logits input and the metric: no gate on the way
    assert torch.equal(logits_slot, st.scores[:, -1])
    with pytest.raises(ConfigError, match="gate gradient 'soft' is unknown; choose one of hard, straight-through"):
        attribute(gated, batch, metric=logit_difference, gate_gradient="soft")
