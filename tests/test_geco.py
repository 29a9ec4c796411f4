import math

import pytest

from spartan_cli.config import GecoConfig
from spartan_cli.errors import ConfigError
from spartan_cli.training.geco import GecoState, geco_update, tolerance_at


def _run(ces, tau, cfg):
    state = GecoState.initial(cfg)
    betas = []
    for ce in ces:
        state = geco_update(state, ce, tau, cfg)
        betas.append(state.beta)
    return state, betas


def test_beta_rises_while_constraint_holds_and_falls_once_violated():
    cfg = GecoConfig(warmup_steps=0, smoothing=0.5, rate=0.5, max_log_step=0.1)
    state, up = _run([2.0] * 50, tau=3.0, cfg=cfg)  # CE below target: sparsity pressure grows
    assert all(b2 > b1 for b1, b2 in zip(up, up[1:]))
    state2 = state
    downs = []
    for _ in range(50):  # CE above target: pressure falls
        state2 = geco_update(state2, 4.0, 3.0, cfg)
        downs.append(state2.beta)
    assert downs[-1] < up[-1]
    assert downs[-1] < downs[10]


def test_warmup_holds_beta_but_tracks_the_constraint():
    cfg = GecoConfig(warmup_steps=10)
    state, betas = _run([5.0] * 10, tau=3.0, cfg=cfg)
    assert betas == [cfg.beta_init] * 10
    assert state.c_ma > 0


def test_step_is_clamped_in_log_space():
    cfg = GecoConfig(warmup_steps=0, smoothing=0.0, rate=100.0, max_log_step=0.05)
    state, betas = _run([0.0], tau=3.0, cfg=cfg)
    assert math.log(betas[0] / cfg.beta_init) == pytest.approx(0.05)


def test_infeasible_target_pins_beta_at_floor_and_is_reported():
    cfg = GecoConfig(warmup_steps=0, beta_init=1e-3, beta_min=1e-4, max_log_step=0.5, rate=10.0)
    state, betas = _run([10.0] * 200, tau=1.0, cfg=cfg)
    assert min(betas) >= cfg.beta_min
    assert betas[-1] == pytest.approx(cfg.beta_min)
    assert state.infeasible


def test_beta_ceiling():
    cfg = GecoConfig(warmup_steps=0, beta_max=1.0, max_log_step=1.0, rate=10.0)
    _, betas = _run([0.0] * 100, tau=1.0, cfg=cfg)
    assert max(betas) == pytest.approx(1.0)


def test_state_round_trip():
    s = GecoState(beta=0.3, c_ma=-0.1, steps=7, floor_steps=2)
    assert GecoState.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad", [{"beta_init": -1.0}, {"smoothing": 1.0}, {"beta_init": 1e9}, {"nope": 1}])
def test_bad_geco_config_names_the_field(bad):
    with pytest.raises(ConfigError) as err:
        GecoConfig.from_dict(bad)
    assert list(bad)[0] in str(err.value)


def test_settle_phase_lets_beta_fall_but_not_rise():
    cfg = GecoConfig(warmup_steps=0, smoothing=0.0, rate=1.0)
    state = GecoState(beta=1.0)
    assert geco_update(state, 0.0, 1.0, cfg, settling=True).beta == 1.0  # constraint holds: no rise
    assert geco_update(state, 2.0, 1.0, cfg, settling=True).beta < 1.0  # violated: falls as usual


def test_the_step_depends_on_the_slack_in_nats_not_on_the_size_of_the_loss():
    cfg = GecoConfig(warmup_steps=0, rate=0.5, max_log_step=1.0, smoothing=0.0)
    _, small = _run([0.0] * 5, tau=0.01, cfg=cfg)  # addition-sized loss, 0.01 nats of slack
    _, large = _run([4.79] * 5, tau=4.8, cfg=cfg)  # language-model-sized loss, the same slack
    assert small == pytest.approx(large, rel=1e-6)
    assert large[-1] / large[0] == pytest.approx(math.exp(4 * 0.5 * 0.01 / 0.05), rel=1e-6)  # 0.1 a step


def test_batch_reference_holds_the_step_against_the_dense_model_on_the_same_rows():
    """geco.reference "batch": the recorded reference CE is the dense model's CE on the step's rows, and
    the multiplier moves on (CE - reference CE) against the tolerance."""
    import copy

    import torch

    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import GateConfig, TrainConfig
    from spartan_cli.errors import SpartanError
    from spartan_cli.training.train import SparsifyConfig, _micro_batch, sparsify
    from tests.micro import BUILDERS, VOCAB

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (24, 16), generator=g)
    data = Splits(TokenBlocks(x[:16], x[:16].clone()), TokenBlocks(x[16:], x[16:].clone()))
    dense = BUILDERS["gpt2"]().eval()
    reference = copy.deepcopy(dense).requires_grad_(False)
    model = attach_gates(dense, GateConfig(bias=1.0))
    geco = GecoConfig(reference="batch", warmup_steps=0, smoothing=0.0, rate=0.5, max_log_step=1.0)
    cfg = SparsifyConfig(geco=geco, train=TrainConfig(steps=2, batch_size=4, lr=1e-3, log_every=1, eval_every=0,
                                                      tolerance=0.02))
    rows = _micro_batch(16, 4, 0, 0)
    with torch.no_grad():
        want = float(reference(input_ids=x[rows], labels=x[rows]).loss)
    records = []
    sparsify(model, data, cfg, on_step=records.append, reference=reference)
    first = records[0]
    assert first.ref_ce == pytest.approx(want, rel=1e-5)
    step = max(-1.0, min(1.0, -0.5 * ((first.ce - first.ref_ce) - 0.02) / 0.05))
    assert first.beta == pytest.approx(geco.beta_init * math.exp(step), rel=1e-6)
    with pytest.raises(SpartanError, match="reference"):
        sparsify(model, data, cfg)
    # geco.gates "deterministic": the constraint reads a no-grad forward of the same rows with 1[g > 0]
    from spartan_cli.gating.scopes import deterministic_gates

    fresh = attach_gates(copy.deepcopy(reference).requires_grad_(True), GateConfig(bias=1.0))
    with torch.no_grad(), deterministic_gates(fresh):
        want_det = float(fresh(input_ids=x[rows], labels=x[rows]).loss)
    det_cfg = SparsifyConfig(geco=GecoConfig(reference="batch", gates="deterministic", warmup_steps=0,
                                             smoothing=0.0, rate=0.5, max_log_step=1.0), train=cfg.train)
    records = []
    sparsify(fresh, data, det_cfg, on_step=records.append, reference=reference)
    first = records[0]
    assert first.det_ce == pytest.approx(want_det, rel=1e-5) and first.det_ce != pytest.approx(first.ce, rel=1e-6)
    step = max(-1.0, min(1.0, -0.5 * ((first.det_ce - first.ref_ce) - 0.02) / 0.05))
    assert first.beta == pytest.approx(geco.beta_init * math.exp(step), rel=1e-6)
    with pytest.raises(ConfigError, match="geco.reference"):
        GecoConfig(reference="dense")
    with pytest.raises(ConfigError, match="geco.gates"):
        GecoConfig(gates="open")


def test_annealed_tolerance_narrows_linearly_to_the_target_by_the_settle_phase():
    cfg = GecoConfig(tolerance_start=0.1, settle_fraction=0.2)
    steps, tol = 1000, 0.01
    assert tolerance_at(0, steps, tol, cfg) == pytest.approx(0.1)
    assert tolerance_at(400, steps, tol, cfg) == pytest.approx(0.1 + (0.01 - 0.1) * 0.5)
    assert tolerance_at(800, steps, tol, cfg) == pytest.approx(0.01)  # settle phase starts at step 800
    assert tolerance_at(999, steps, tol, cfg) == pytest.approx(0.01)
    values = [tolerance_at(k, steps, tol, cfg) for k in range(0, 1000, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert tolerance_at(0, steps, tol, GecoConfig()) == tol  # no start: the tolerance from step 0
    # a start tighter than the tolerance (the shakespeare preset's 0.1 under --tolerance 0.2) never tightens it
    assert [tolerance_at(k, steps, 0.2, cfg) for k in (0, 400, 999)] == [0.2, 0.2, 0.2]


def test_negative_tolerance_start_is_refused():
    with pytest.raises(ConfigError, match="tolerance_start"):
        GecoConfig(tolerance_start=-0.1)


def test_validation_reference_reads_rows_never_trained_on_against_the_dense_model():
    """geco.reference "validation": validation rows leave the training set; each step's constraint is the
    deterministic-gate CE of a cycled validation batch minus the dense model's CE on the same rows."""
    import copy

    import torch

    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import GateConfig, TrainConfig
    from spartan_cli.errors import SpartanError
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.gating.scopes import deterministic_gates
    from spartan_cli.training.train import SparsifyConfig, sparsify, validation_split
    from tests.micro import BUILDERS, VOCAB

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (40, 16), generator=g)
    data = Splits(TokenBlocks(x[:32], x[:32].clone()), TokenBlocks(x[32:], x[32:].clone()))
    carved = validation_split(data, 4)
    assert len(carved.validation) == 4 and len(carved.train) == 28  # max(one batch, 5%) off the end
    assert torch.equal(carved.validation.input_ids, x[28:32]) and torch.equal(carved.train.input_ids, x[:28])
    with pytest.raises(SpartanError, match="validation"):
        validation_split(Splits(data.train.slice(0, 6), data.heldout), 4)

    dense = BUILDERS["gpt2"]().eval()
    with torch.no_grad():  # the dense model on the first validation batch (rows 28..31)
        want_ref = float(dense(input_ids=x[28:32], labels=x[28:32]).loss)
    model = attach_gates(copy.deepcopy(dense), GateConfig(bias=1.0))
    geco = GecoConfig(reference="validation", warmup_steps=0, smoothing=0.0, rate=0.5, max_log_step=1.0)
    cfg = SparsifyConfig(geco=geco, train=TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1, eval_every=0,
                                                      tolerance=0.02))
    records = []
    sparsify(model, data, cfg, on_step=records.append)
    first = records[0]
    with torch.no_grad(), deterministic_gates(model):  # after the step's update, as the trainer reads it
        want_det = float(model(input_ids=x[28:32], labels=x[28:32]).loss)
    assert first.ref_ce == pytest.approx(want_ref, rel=1e-5)
    assert first.det_ce == pytest.approx(want_det, rel=1e-5)
    step = max(-1.0, min(1.0, -0.5 * ((first.det_ce - first.ref_ce) - 0.02) / 0.05))
    assert first.beta == pytest.approx(geco.beta_init * math.exp(step), rel=1e-6)


@pytest.mark.parametrize("eval_batches", [None, 1])
def test_periodic_evaluation_is_held_against_the_dense_ce_of_the_same_rows(eval_batches):
    """A periodic held-out evaluation capped to its first batches records the target on those rows
    (dense CE there + tolerance), not the target of every held-out row."""
    import torch

    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import GateConfig, TrainConfig
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.training.train import SparsifyConfig, sparsify
    from tests.micro import BUILDERS, VOCAB

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (32, 16), generator=g)
    data = Splits(TokenBlocks(x[:16], x[:16].clone()), TokenBlocks(x[16:], x[16:].clone()))
    dense = BUILDERS["gpt2"]().eval()
    with torch.no_grad():
        first = float(dense(input_ids=x[16:24], labels=x[16:24]).loss)  # the first held-out batch (8 rows)
    model = attach_gates(dense, GateConfig(bias=1.0))
    cfg = SparsifyConfig(train=TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1, eval_every=1,
                                           eval_batches=eval_batches, tolerance=0.02))
    records = []
    result, _ = sparsify(model, data, cfg, on_step=records.append)
    want = result.tau if eval_batches is None else first + 0.02
    assert records[0].heldout_tau == pytest.approx(want, rel=1e-5)
    assert (records[0].heldout_tau != pytest.approx(result.tau, rel=1e-6)) == (eval_batches is not None)


def test_next_token_kl_is_the_kl_of_the_scored_positions():
    import torch

    from spartan_cli.training.train import next_token_kl

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100  # positions 2 and 3 of row 1 predict unscored tokens
    pt, ls = torch.softmax(t, -1), torch.log_softmax(s, -1)
    per = (pt * (pt.log() - ls)).sum(-1)[:, :-1]  # (2, 4): position p predicts token p + 1
    want = torch.cat([per[0], per[1, :2]]).mean()
    assert float(next_token_kl(t, s, labels)) == pytest.approx(float(want), rel=1e-6)
    assert float(next_token_kl(t, t, labels)) == pytest.approx(0.0, abs=1e-7)


def test_kl_constraint_reads_the_kl_to_the_dense_model_on_the_validation_rows():
    """geco.constraint "kl": the multiplier moves on KL(dense || sparse) of the validation batch against
    the tolerance; it needs the dense model beside the student and a reference other than heldout."""
    import copy

    import torch

    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import GateConfig, TrainConfig
    from spartan_cli.errors import SpartanError
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.gating.scopes import deterministic_gates
    from spartan_cli.training.train import SparsifyConfig, next_token_kl, sparsify
    from tests.micro import BUILDERS, VOCAB

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (40, 16), generator=g)
    data = Splits(TokenBlocks(x[:32], x[:32].clone()), TokenBlocks(x[32:], x[32:].clone()))
    dense = BUILDERS["gpt2"]().eval()
    teacher = copy.deepcopy(dense).requires_grad_(False)
    model = attach_gates(copy.deepcopy(dense), GateConfig(bias=1.0))
    geco = GecoConfig(reference="validation", constraint="kl", warmup_steps=0, smoothing=0.0, rate=0.5,
                      max_log_step=1.0)
    cfg = SparsifyConfig(geco=geco, train=TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1, eval_every=0,
                                                      tolerance=0.02))
    records = []
    sparsify(model, data, cfg, on_step=records.append, reference=teacher)
    rows = x[28:32]  # the first validation batch: the last 4 training blocks, carved off
    with torch.no_grad(), deterministic_gates(model):
        want = float(next_token_kl(teacher(input_ids=rows).logits, model(input_ids=rows).logits, rows))
    first = records[0]
    assert first.kl == pytest.approx(want, rel=1e-5) and first.kl > 0
    step = max(-1.0, min(1.0, -0.5 * (first.kl - 0.02) / 0.05))
    assert first.beta == pytest.approx(geco.beta_init * math.exp(step), rel=1e-6)
    with pytest.raises(SpartanError, match="reference model"):
        sparsify(model, data, cfg)
    with pytest.raises(ConfigError, match="batch or validation"):
        GecoConfig(constraint="kl")
    # gates that never shut (b = 1e4): the student is the teacher and the trained KL is zero
    open_model = attach_gates(copy.deepcopy(dense), GateConfig(bias=1e4))
    records = []
    batch_cfg = SparsifyConfig(geco=GecoConfig(reference="batch", constraint="kl"), train=cfg.train)
    sparsify(open_model, data, batch_cfg, on_step=records.append, reference=teacher)
    assert records[0].kl == pytest.approx(0.0, abs=1e-6)

