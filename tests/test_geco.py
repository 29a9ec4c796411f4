import math

import pytest

from spartan_cli.config import GecoConfig
from spartan_cli.errors import ConfigError
from spartan_cli.geco import GecoState, geco_update


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
