"""The GECO trainer: post-train a gated model to sparse attention at constant loss.

1. Measure the target: tau = CE of the model with every gate open (= the dense base model) on the
   held-out blocks, plus the user's tolerance; also the step-0 deterministic density.
2. Each step: sampled gates (straight-through), loss = CE + beta * R with R the mean gate-open
   probability over layers, heads, sequences and allowed pairs; AdamW on the chosen weights.
3. After each step the multiplier follows geco.geco_update from the step's CE (plain log-space ascent):
   against tau, or (``geco.reference = "batch"``) the step's CE minus a frozen dense reference model's CE
   on the same rows, against the tolerance. The step's CE is the sampled-gate training CE, or
   (``geco.gates = "deterministic"``) that of a no-grad forward of the same rows with gates 1[g > 0].
4. Periodically: held-out CE and density with deterministic gates; a resumable TrainerState is handed to
   ``on_checkpoint``. ``should_stop`` (e.g. a signal) ends the run after a complete step, with a state.
5. In a process group (torchrun / accelerate launch), each rank computes its slice of every global
   micro-batch, with gate noise seeded per global row; see distributed.py for what is synchronised.
The trainer touches no files: the caller persists states and logs.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from spartan_cli.training import distributed
from spartan_cli.gating.attention import gate_states
from spartan_cli.blocks import Splits
from spartan_cli.config import GateConfig, GecoConfig, TrainConfig
from spartan_cli.errors import SpartanError
from spartan_cli.training.geco import GecoState, geco_update, tolerance_at
from spartan_cli.measure.heldout import measure
from spartan_cli.gating.scopes import deterministic_gates, gates_open, no_dropout, recording

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SparsifyConfig:
    gate: GateConfig = field(default_factory=GateConfig)
    geco: GecoConfig = field(default_factory=GecoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class StepRecord:
    """One logged step, also one line of train_log.jsonl."""

    step: int
    ce: float  # training CE (sampled gates), nats
    tau: float  # target, nats
    beta: float
    c_ma: float
    reg: float  # R, mean gate-open probability
    density: float  # deterministic density on this step's training batch
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    heldout_ce: float | None = None  # deterministic gates, when evaluated this step
    heldout_density: float | None = None
    skipped: bool = False  # non-finite loss: the update was skipped
    ref_ce: float | None = None  # the frozen reference model's CE on the same rows (geco.reference "batch")
    det_ce: float | None = None  # CE of the same rows with deterministic gates (geco.gates "deterministic")


@dataclass
class TrainerState:
    """Everything needed to resume bit-for-bit: weights live in the model, the rest is here."""

    step: int
    geco: GecoState
    tau: float
    base_ce: float
    step0_density: float
    optimizer: dict
    rng: dict  # torch / cuda generator states (gate noise is reseeded per row and micro-batch)
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    bad_steps: int = 0


@dataclass(frozen=True)
class SparsifyResult:
    steps: int
    base_ce: float
    tau: float
    step0_density: float
    heldout_ce: float
    density: float
    beta: float
    infeasible: bool
    interrupted: bool
    tokens_per_s: float
    elapsed_s: float
    density_per_head: list  # (n_layers, n_heads) nested list


class NonFiniteLoss(SpartanError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SpartanError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpartanError(f"device {name!r} asked for but CUDA is not available; use --device cpu or auto")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def trainable_parameters(model, which: str):
    from spartan_cli.hf.models import adapter_for

    if which == "all":
        names = {n for n, _ in model.named_parameters()}
    else:
        names = set(adapter_for(model).attention_param_names(model))
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        if n in names:
            params.append(p)
    return params


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.lr_warmup_steps) / max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 10% of the peak


def _micro_batch(n_blocks: int, batch_size: int, index: int, seed: int) -> torch.Tensor:
    """Row indices of global micro-batch ``index``: epochs of seeded permutations, so resume is exact."""
    per_epoch = max(1, n_blocks // batch_size)
    epoch, k = divmod(index, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_blocks, generator=g)
    if n_blocks < batch_size:
        return perm.repeat(math.ceil(batch_size / n_blocks))[:batch_size]
    return perm[k * batch_size:(k + 1) * batch_size]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])  # a "gate" entry of older states is not needed: noise is reseeded per row
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sparsify(
    model,
    data: Splits,
    cfg: SparsifyConfig,
    *,
    on_step: Callable[[StepRecord], None] | None = None,
    on_checkpoint: Callable[[TrainerState], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: TrainerState | None = None,
    reference=None,
) -> tuple[SparsifyResult, TrainerState]:
    """Post-train the gated ``model`` (in place) on ``data``; returns the result and the final state.

    ``reference``: the dense base model, frozen, on the same device; needed when ``geco.reference`` is
    "batch" (each step's constraint is the CE gap to it on the same rows)."""
    if (cfg.geco.reference == "batch") != (reference is not None):
        raise SpartanError("geco.reference 'batch' needs a reference model, and only it does; pass reference= "
                           "with the dense base model, or use geco.reference 'heldout'")
    tc, gc = cfg.train, cfg.geco
    device = next(model.parameters()).device
    amp_dtype = resolve_dtype(tc.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else None
    states = gate_states(model)
    world = distributed.current()
    local_bs = distributed.check_batch(tc.batch_size, world)
    row_gens = [torch.Generator(device=device) for _ in range(local_bs)]  # gate noise, one stream per row
    for s in states:
        s.generator = row_gens
    eval_bs = max(tc.batch_size, 8)

    trainable_parameters(model, tc.trainable)  # requires_grad set before wrapping: FSDP keeps it on the shards
    step_model = distributed.wrap(model, world, tc.parallel)  # DDP, or FSDP sharding in place; model itself alone
    params = trainable_parameters(model, tc.trainable)  # after wrapping: FSDP replaces parameters by shards

    if resume is None:
        torch.manual_seed(tc.seed)
        with gates_open(model):
            base = measure(model, data.heldout, batch_size=eval_bs)
        step0 = measure(model, data.heldout, batch_size=eval_bs)
        state = TrainerState(step=0, geco=GecoState.initial(gc), tau=base.ce + tc.tolerance, base_ce=base.ce,
                             step0_density=step0.density, optimizer={}, rng={})
        log.info("target tau=%.4f (base %.4f + tolerance %.4f); step-0 density %.4f",
                 state.tau, base.ce, tc.tolerance, step0.density)
    else:
        state = resume

    # fused: one kernel over all parameters (the per-tensor loop took ~10 s a step for a 135M model on CPU)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95), fused=True)
    if resume is not None:
        opt.load_state_dict(distributed.shard_optimizer_state(resume.optimizer, opt))  # full -> this rank's shards
        _set_rng_state(resume.rng)

    n_train = len(data.train)
    tokens_per_step = tc.batch_size * tc.grad_accum * data.train.seq_len
    t_start = time.perf_counter() - state.elapsed_s
    interrupted = False
    geco = state.geco

    def snapshot() -> TrainerState:
        state.geco = geco
        state.optimizer = distributed.optimizer_state(opt, world)  # full moments, whatever the wrapper
        state.rng = _rng_state()
        state.elapsed_s = time.perf_counter() - t_start
        return state

    model.train()
    with no_dropout(model), recording(model):
        while state.step < tc.steps:
            if should_stop is not None and distributed.any_across(should_stop(), world, device):
                interrupted = True  # every rank stops after the same step
                break
            step = state.step
            for group in opt.param_groups:
                group["lr"] = tc.lr * _lr_factor(step, tc)
            ce_sum, ref_sum, det_sum, reg_sum, open_sum, allowed_sum = 0.0, 0.0, 0.0, 0.0, 0, 0
            finite = True
            for a in range(tc.grad_accum):
                index = step * tc.grad_accum + a  # global micro-batch number
                rows = distributed.local_rows(_micro_batch(n_train, tc.batch_size, index, tc.seed), world)
                for r, gen in enumerate(row_gens):  # noise keyed by the global row, not by the rank holding it
                    gen.manual_seed(distributed.row_seed(tc.seed, index, world.rank * local_bs + r))
                ids = data.train.input_ids[rows].to(device)  # (local batch, pos)
                labels = data.train.labels[rows].to(device)
                last = a == tc.grad_accum - 1  # ddp syncs gradients on the last micro-batch only
                with distributed.accumulating(step_model, world, tc.parallel, last=last):
                    with autocast() if autocast else nullcontext():
                        out = step_model(input_ids=ids, labels=labels)
                    ce = out.loss.float()  # mean over this rank's scored tokens
                    reg = torch.stack([s.stats.density_term.mean() for s in states]).mean()  # R in [0, 1]
                    n_tok = (labels[:, 1:] != -100).sum()  # scored tokens here (the model shifts labels)
                    bad = ~torch.isfinite(ce.detach() + geco.beta * reg.detach())
                    opened = torch.stack([s.stats.open_pairs.sum() for s in states]).sum()
                    allowed = states[0].stats.allowed_pairs.sum() * len(states) * states[0].n_heads
                    ref_ce = torch.zeros((), device=device)
                    if reference is not None:
                        with torch.no_grad(), autocast() if autocast else nullcontext():
                            ref_ce = reference(input_ids=ids, labels=labels).loss.float()
                    # (CE * tokens, tokens, R, non-finite, open, allowed, reference CE * tokens) summed over
                    # ranks, fp64: exact counts
                    tot = distributed.sum_across(torch.stack([ce.detach().double() * n_tok, n_tok.double(),
                                                              reg.detach().double(), bad.double(),
                                                              opened.double(), allowed.double(),
                                                              ref_ce.double() * n_tok]), world)
                    if tot[3] > 0:  # every rank sees the same flag and skips together
                        finite = False
                        break
                    share = (n_tok * world.size / tot[1]).to(ce.dtype)  # 1 alone; DDP's rank mean: global CE
                    loss = (ce * share + geco.beta * reg) / tc.grad_accum
                    loss.backward()
                if gc.gates == "deterministic":  # after the backward: this forward's gate stats are not used
                    with torch.no_grad(), deterministic_gates(model), autocast() if autocast else nullcontext():
                        det = model(input_ids=ids, labels=labels).loss.float()
                    det_tot = distributed.sum_across(torch.stack([det.double() * n_tok, n_tok.double()]), world)
                    det_sum += float(det_tot[0] / det_tot[1])
                ce_sum += float(tot[0] / tot[1])
                ref_sum += float(tot[6] / tot[1])
                reg_sum += float(tot[2]) / world.size
                open_sum += int(tot[4])
                allowed_sum += int(tot[5])
            if finite:  # one total norm both clips and tells whether any gradient is inf/nan
                total_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or float("inf"))
                finite = bool(torch.isfinite(total_norm))
            if finite:
                opt.step()
                state.bad_steps = 0
            else:
                state.bad_steps += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", step)
                if state.bad_steps >= 3:
                    opt.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(
                        f"loss was non-finite for {state.bad_steps} steps in a row at step {step}; "
                        "lower --lr or use --dtype float32; the last checkpoint is untouched")
            opt.zero_grad(set_to_none=True)
            ce_mean = ce_sum / tc.grad_accum
            ref_mean = ref_sum / tc.grad_accum if reference is not None else None
            det_mean = det_sum / tc.grad_accum if gc.gates == "deterministic" else None
            constrained = ce_mean if det_mean is None else det_mean
            if finite:
                settling = step >= tc.steps * (1.0 - gc.settle_fraction)
                slack = tolerance_at(step, tc.steps, tc.tolerance, gc)
                if ref_mean is None:
                    geco = geco_update(geco, constrained, state.base_ce + slack, gc, settling=settling)
                else:  # the gap to the dense model on these very rows, against the slack
                    geco = geco_update(geco, constrained - ref_mean, slack, gc, settling=settling)
            state.step = step + 1
            state.tokens_seen += tokens_per_step
            elapsed = time.perf_counter() - t_start
            done = state.step >= tc.steps
            evaluate_now = done or (tc.eval_every and state.step % tc.eval_every == 0)
            record = None
            if on_step is not None and (evaluate_now or state.step == 1 or state.step % tc.log_every == 0 or not finite):
                heldout = None
                if evaluate_now:
                    heldout = measure(model, data.heldout, batch_size=eval_bs, max_batches=tc.eval_batches)
                    model.train()
                rate = state.tokens_seen / max(elapsed, 1e-9)
                record = StepRecord(
                    step=state.step, ce=ce_mean, tau=state.tau, beta=geco.beta, c_ma=geco.c_ma,
                    reg=reg_sum / tc.grad_accum, density=open_sum / max(allowed_sum, 1),
                    lr=opt.param_groups[0]["lr"], tokens_per_s=rate, elapsed_s=elapsed,
                    eta_s=(tc.steps - state.step) * tokens_per_step / max(rate, 1e-9),
                    heldout_ce=heldout.ce if heldout else None,
                    heldout_density=heldout.density if heldout else None, skipped=not finite, ref_ce=ref_mean,
                    det_ce=det_mean,
                )
                on_step(record)
            if on_checkpoint is not None and tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and not done:
                on_checkpoint(snapshot())
    model.eval()
    for s in states:
        s.generator = None  # the row streams fit this run's batch only
    final = measure(model, data.heldout, batch_size=eval_bs)
    snap = snapshot()
    result = SparsifyResult(
        steps=state.step, base_ce=state.base_ce, tau=state.tau, step0_density=state.step0_density,
        heldout_ce=final.ce, density=final.density, beta=geco.beta, infeasible=geco.infeasible,
        interrupted=interrupted, tokens_per_s=state.tokens_seen / max(snap.elapsed_s, 1e-9),
        elapsed_s=snap.elapsed_s, density_per_head=final.density_per_head.tolist(),
    )
    return result, snap

