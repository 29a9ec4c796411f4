"""The GECO multiplier: a pure update rule on scalars.

Objective (docs/method.md): minimise expected attention edges subject to CE <= tau. Practical form from the
predecessor paper (SPARTAN, arXiv 2411.06890; GECO, Rezende & Viola 2018):
1. loss = CE + beta * R, R the mean gate-open probability (beta = 1 / lambda, the inverse multiplier).
2. c_ma <- m * c_ma + (1 - m) * (CE - tau)                    (smoothed constraint, nats)
3. log beta <- log beta - alpha * c_ma / scale, the step clamped to +-max_log_step and log beta to
   [log beta_min, log beta_max]; scale = 0.05 nats unless set. beta grows while the constraint
   holds and falls when it is violated. Plain log-space ascent, never through Adam. The scale is
   absolute, not relative to tau: a language model's tau is several nats, and dividing by it made
   beta crawl (a 0.01-nat slack moved log beta by 0.001 a step, so density barely fell in a run).
4. During warm-up beta stays at beta_init (sampled gates first raise CE above tau; letting beta collapse
   then is the trap docs/method.md describes), while c_ma is tracked so it is warm when updates start.
5. In the settle phase (the last ``settle_fraction`` of the run) beta may only fall: the pressure stops
   growing so the run ends on the feasible side of the constraint instead of mid-oscillation.
6. Optionally the tolerance itself is annealed (``tolerance_start``, ``tolerance_at``): a loose slack at
   first lets density fall fast, then the slack narrows to the user's tolerance before the settle phase.
7. beta pinned at beta_min while c_ma > 0 means the target looks infeasible: reported, not diverged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from spartan_cli.config import GecoConfig

DEFAULT_SCALE = 0.05  # nats: one unit of constraint, whatever the size of the loss


@dataclass(frozen=True)
class GecoState:
    beta: float
    c_ma: float = 0.0  # smoothed CE - tau, nats
    steps: int = 0  # updates seen
    floor_steps: int = 0  # consecutive updates with beta at its floor and the constraint violated

    @classmethod
    def initial(cls, cfg: GecoConfig) -> "GecoState":
        return cls(beta=cfg.beta_init)

    @property
    def infeasible(self) -> bool:
        return self.floor_steps >= 100

    def to_dict(self) -> dict:
        return {"beta": self.beta, "c_ma": self.c_ma, "steps": self.steps, "floor_steps": self.floor_steps}

    @classmethod
    def from_dict(cls, d: dict) -> "GecoState":
        return cls(**{k: d[k] for k in ("beta", "c_ma", "steps", "floor_steps")})


def tolerance_at(step: int, steps: int, tolerance: float, cfg: GecoConfig) -> float:
    """The constraint's slack at ``step``: ``cfg.tolerance_start`` narrowed linearly to ``tolerance`` by the
    start of the settle phase, then held; ``tolerance`` throughout when no start is set, or when the start is
    tighter than the tolerance (the slack only narrows: a preset's start never tightens a looser --tolerance)."""
    if cfg.tolerance_start is None or cfg.tolerance_start <= tolerance:
        return tolerance
    end = steps * (1.0 - cfg.settle_fraction)
    frac = min(1.0, step / end) if end > 0 else 1.0
    return cfg.tolerance_start + (tolerance - cfg.tolerance_start) * frac


def geco_update(state: GecoState, ce: float, tau: float, cfg: GecoConfig, *, settling: bool = False) -> GecoState:
    """One multiplier update from this step's CE (nats) against the target tau (nats)."""
    m = cfg.smoothing
    c_ma = (ce - tau) if state.steps == 0 else m * state.c_ma + (1.0 - m) * (ce - tau)
    steps = state.steps + 1
    if steps <= cfg.warmup_steps:
        return replace(state, c_ma=c_ma, steps=steps)
    scale = cfg.scale if cfg.scale is not None else DEFAULT_SCALE
    step = -cfg.rate * c_ma / scale
    step = max(-cfg.max_log_step, min(0.0 if settling else cfg.max_log_step, step))
    log_beta = min(math.log(cfg.beta_max), max(math.log(cfg.beta_min), math.log(state.beta) + step))
    beta = math.exp(log_beta)
    at_floor = beta <= cfg.beta_min * (1 + 1e-9) and c_ma > 0
    return GecoState(beta=beta, c_ma=c_ma, steps=steps, floor_steps=state.floor_steps + 1 if at_floor else 0)
