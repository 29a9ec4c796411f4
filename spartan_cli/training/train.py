"""The GECO trainer: post-train a gated model to sparse attention at constant loss.

1. Measure the target: tau = CE of the model with every gate open (= the dense base model) on the
   held-out blocks, plus the user's tolerance; also the step-0 deterministic density.
2. Each step: sampled gates (straight-through), loss = CE + beta * R with R the mean gate-open
   probability over layers, heads, sequences and allowed pairs; AdamW on the chosen weights.
3. After each step the multiplier follows geco.geco_update from the step's CE (plain log-space ascent):
   against tau, or (``geco.reference = "batch"``) the step's CE minus a frozen dense reference model's CE
   on the same rows, against the tolerance. The step's CE is the sampled-gate training CE, or
   (``geco.gates = "deterministic"``) that of a no-grad forward of the same rows with gates 1[g > 0].
   With ``geco.reference = "validation"`` the constraint is read on rows the model never trains on: the
   deterministic-gate CE of a cycled batch of validation rows minus the dense model's CE on the same rows,
   measured once at step 0. Training rows understate the gap as the model goes on fitting them.
4. Periodically: held-out CE and density with deterministic gates; a resumable TrainerState is handed to
   ``on_checkpoint``. ``should_stop`` (e.g. a signal) ends the run after a complete step, with a state.
5. In a process group (torchrun / accelerate launch), each rank computes its slice of every global
   micro-batch, with gate noise seeded per global row; see distributed.py for what is synchronised.
The trainer touches no files: the caller persists states and logs. ``sparsify`` is the loop; its steps
are ``_setup``, ``_initial_state``, ``_micro_step`` (forward, backward, rank sums), ``_apply_update``,
``_validation_ce``, ``_update_multiplier`` and ``_step_record``.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from spartan_cli.training import distributed
from spartan_cli.gating.attention import gate_states
from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.config import GateConfig, GecoConfig, TrainConfig
from spartan_cli.errors import SpartanError
from spartan_cli.training.geco import GecoState, geco_update, tolerance_at
from spartan_cli.measure.heldout import measure
from spartan_cli.gating.scopes import deterministic_gates, evaluating, gates_open, no_dropout, recording

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
    heldout_tau: float | None = None  # the target on the evaluated held-out rows (tau unless eval_batches caps them)
    ref_ce: float | None = None  # the frozen reference model's CE on the same rows (geco.reference "batch")
    det_ce: float | None = None  # CE of the same rows with deterministic gates (geco.gates "deterministic")
    kl: float | None = None  # geco.constraint "kl": KL(dense || sparse) per token, what the multiplier reads
    slack: float | None = None  # the tolerance the constraint is held to at this step (tolerance_at)


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
    # geco.reference "validation": the dense model's summed CE and scored tokens per validation row
    validation_ref: dict | None = None
    eval_base_ce: float | None = None  # the dense CE on the periodic evaluation's rows, when eval_batches caps them


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
    """Set requires_grad on the parameters that train -> them: ``which`` = all | attention | lora (the
    adapters of training.lora alone)."""
    from spartan_cli.hf.models import adapter_for
    from spartan_cli.training.lora import is_adapter_parameter

    if which == "all":
        names = {n for n, _ in model.named_parameters()}
    elif which == "lora":
        names = {n for n, _ in model.named_parameters() if is_adapter_parameter(n)}
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


@dataclass
class _Run:
    """What every step of one run uses: the model and its wrapper, gates, optimizer, process group, data."""

    model: Any
    step_model: Any  # the model itself, or its DDP/FSDP wrapper
    reference: Any  # the frozen dense model (geco.reference "batch"), or None
    data: Splits
    tc: TrainConfig
    gc: GecoConfig
    device: torch.device
    autocast: Callable | None  # a fresh autocast context per call, or None in float32
    states: list  # GateState per layer
    world: Any  # distributed.World
    local_bs: int
    row_gens: list  # gate-noise generator per local row
    params: list
    opt: torch.optim.Optimizer
    eval_bs: int
    tokens_per_step: int
    validation: TokenBlocks | None = None  # geco.reference "validation": rows the constraint is read on

    def amp(self):
        return self.autocast() if self.autocast else nullcontext()


@dataclass
class _Totals:
    """One step's sums over its micro-batches (each already summed over ranks)."""

    ce: float = 0.0  # sampled-gate training CE
    ref: float = 0.0  # the reference model's CE on the same rows
    det: float = 0.0  # CE of the same rows with deterministic gates
    reg: float = 0.0  # R
    opened: int = 0
    allowed: int = 0
    kl: float = 0.0  # KL(dense || sparse) per token (geco.constraint "kl")


def _setup(model, data: Splits, cfg: SparsifyConfig, reference, resume: TrainerState | None) -> _Run:
    """Device, precision, gate-noise streams, the process-group wrapper and the optimizer (resumed if asked)."""
    tc = cfg.train
    device = next(model.parameters()).device
    amp_dtype = resolve_dtype(tc.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else None
    states = gate_states(model)
    world = distributed.current()
    local_bs = distributed.check_batch(tc.batch_size, world)
    row_gens = [torch.Generator(device=device) for _ in range(local_bs)]  # gate noise, one stream per row
    for s in states:
        s.generator = row_gens
    which = "lora" if tc.lora_rank else tc.trainable
    trainable_parameters(model, which)  # requires_grad set before wrapping: FSDP keeps it on the shards
    step_model = distributed.wrap(model, world, tc.parallel)  # DDP, or FSDP sharding in place; model itself alone
    params = trainable_parameters(model, which)  # after wrapping: FSDP replaces parameters by shards
    # fused: one kernel over all parameters (the per-tensor loop took ~10 s a step for a 135M model on CPU)
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95), fused=True)
    if resume is not None:
        opt.load_state_dict(distributed.shard_optimizer_state(resume.optimizer, opt))  # full -> this rank's shards
        _set_rng_state(resume.rng)
    return _Run(model=model, step_model=step_model, reference=reference, data=data, tc=tc, gc=cfg.geco,
                device=device, autocast=autocast, states=states, world=world, local_bs=local_bs, row_gens=row_gens,
                params=params, opt=opt, eval_bs=max(tc.batch_size, 8),
                tokens_per_step=tc.batch_size * tc.grad_accum * data.train.seq_len,
                validation=data.validation if cfg.geco.reference == "validation" else None)


def validation_split(data: Splits, batch_size: int) -> Splits:
    """``data`` with validation rows for ``geco.reference = "validation"``: its own, else the last
    min(128, 5%) training blocks (at least one batch), taken out of training."""
    if data.validation is not None:
        return data
    n = min(128, max(batch_size, len(data.train) // 20))
    if len(data.train) < n + batch_size:
        raise SpartanError(f"geco.reference 'validation' takes {n} training blocks to read the constraint on, but "
                           f"there are only {len(data.train)}; give more text or use geco.reference 'heldout'")
    keep = len(data.train) - n
    return Splits(train=data.train.slice(0, keep), heldout=data.heldout, validation=data.train.slice(keep, len(data.train)))


def _row_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token CE (nats, float64, on the CPU) and scored tokens: (rows, pos, vocab) logits."""
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100,
                                           reduction="none")  # (rows, pos - 1)
    return ce.double().sum(1).cpu(), (target != -100).sum(1).cpu()


def row_losses(model, blocks: TokenBlocks, *, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed CE (nats, float64) and scored tokens of ``blocks``, no grad, as the model is now."""
    sums, counts = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for part in blocks.batches(batch_size):
            s, c = _row_ce(model(input_ids=part.input_ids.to(device)).logits, part.labels.to(device))
            sums.append(s)
            counts.append(c)
    return torch.cat(sums), torch.cat(counts)


def _initial_state(model, data: Splits, cfg: SparsifyConfig, eval_bs: int) -> TrainerState:
    """Step 1 of the module docstring: the target from the dense model's held-out CE, the step-0 density;
    with geco.reference "validation", the dense model's CE on every validation row."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    validation_ref = None
    with gates_open(model):
        base = measure(model, data.heldout, batch_size=eval_bs)
        if cfg.geco.reference == "validation":
            with no_dropout(model), evaluating(model):
                sums, counts = row_losses(model, data.validation, batch_size=eval_bs)
            validation_ref = {"ce_sum": sums.tolist(), "tokens": counts.tolist()}
        eval_base = None if tc.eval_batches is None else measure(model, data.heldout, batch_size=eval_bs,
                                                                 max_batches=tc.eval_batches).ce
    step0 = measure(model, data.heldout, batch_size=eval_bs)
    state = TrainerState(step=0, geco=GecoState.initial(cfg.geco), tau=base.ce + tc.tolerance, base_ce=base.ce,
                         step0_density=step0.density, optimizer={}, rng={}, validation_ref=validation_ref,
                         eval_base_ce=eval_base)
    log.info("target tau=%.4f (base %.4f + tolerance %.4f); step-0 density %.4f",
             state.tau, base.ce, tc.tolerance, step0.density)
    return state


def _micro_step(run: _Run, step: int, a: int, beta: float, totals: _Totals) -> bool:
    """Forward and backward of micro-batch ``a`` of ``step`` on this rank's rows; adds its rank-summed
    figures to ``totals``. False (nothing added, no backward) when the loss is non-finite on any rank."""
    tc, world = run.tc, run.world
    index = step * tc.grad_accum + a  # global micro-batch number
    rows = distributed.local_rows(_micro_batch(len(run.data.train), tc.batch_size, index, tc.seed), world)
    for r, gen in enumerate(run.row_gens):  # noise keyed by the global row, not by the rank holding it
        gen.manual_seed(distributed.row_seed(tc.seed, index, world.rank * run.local_bs + r))
    ids = run.data.train.input_ids[rows].to(run.device)  # (local batch, pos)
    labels = run.data.train.labels[rows].to(run.device)
    last = a == tc.grad_accum - 1  # ddp syncs gradients on the last micro-batch only
    states = run.states
    with distributed.accumulating(run.step_model, world, tc.parallel, last=last):
        with run.amp():
            out = run.step_model(input_ids=ids, labels=labels)
        ce = out.loss.float()  # mean over this rank's scored tokens
        reg = torch.stack([s.stats.density_term.mean() for s in states]).mean()  # R in [0, 1]
        n_tok = (labels[:, 1:] != -100).sum()  # scored tokens here (the model shifts labels)
        bad = ~torch.isfinite(ce.detach() + beta * reg.detach())
        opened = torch.stack([s.stats.open_pairs.sum() for s in states]).sum()
        allowed = states[0].stats.allowed_pairs.sum() * len(states) * states[0].n_heads
        ref_ce = kl = torch.zeros((), device=run.device)
        if run.reference is not None:
            with torch.no_grad(), run.amp():
                ref = run.reference(input_ids=ids, labels=labels)
            ref_ce = ref.loss.float()
            if run.gc.constraint == "kl":
                kl = next_token_kl(ref.logits, out.logits, labels)
                bad = bad | ~torch.isfinite(kl.detach())
        # (CE * tokens, tokens, R, non-finite, open, allowed, reference CE * tokens, KL * tokens) summed over
        # ranks, fp64: exact counts
        tot = distributed.sum_across(torch.stack([ce.detach().double() * n_tok, n_tok.double(), reg.detach().double(),
                                                  bad.double(), opened.double(), allowed.double(),
                                                  ref_ce.double() * n_tok, kl.detach().double() * n_tok]), world)
        if tot[3] > 0:  # every rank sees the same flag and skips together
            return False
        share = (n_tok * world.size / tot[1]).to(ce.dtype)  # 1 alone; DDP's rank mean: global CE
        trained = kl if run.gc.constraint == "kl" else ce  # distillation, or the data's next tokens
        ((trained * share + beta * reg) / tc.grad_accum).backward()
    if run.gc.gates == "deterministic" and run.validation is None:  # after the backward: its gate stats go unused
        with torch.no_grad(), deterministic_gates(run.model), run.amp():
            det = run.model(input_ids=ids, labels=labels).loss.float()
        det_tot = distributed.sum_across(torch.stack([det.double() * n_tok, n_tok.double()]), world)
        totals.det += float(det_tot[0] / det_tot[1])
    totals.ce += float(tot[0] / tot[1])
    totals.ref += float(tot[6] / tot[1])
    totals.reg += float(tot[2]) / world.size
    totals.opened += int(tot[4])
    totals.allowed += int(tot[5])
    totals.kl += float(tot[7] / tot[1])
    return True


def next_token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over the scored positions (those whose
    next label is not -100), in fp32: (batch, pos, vocab) logits -> a scalar with the student's gradient."""
    scored = labels[:, 1:] != -100  # (batch, pos - 1): position t predicts token t + 1
    t = torch.log_softmax(teacher_logits[:, :-1].float(), dim=-1)[scored]  # (n, vocab)
    s = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)[scored]
    return (t.exp() * (t - s)).sum(-1).mean() if len(t) else student_logits.sum() * 0.0


def _apply_update(run: _Run, state: TrainerState, step: int, finite: bool) -> bool:
    """Clip and apply the accumulated gradient, or skip a non-finite one (three in a row end the run)."""
    if finite:  # one total norm both clips and tells whether any gradient is inf/nan
        total_norm = torch.nn.utils.clip_grad_norm_(run.params, run.tc.grad_clip or float("inf"))
        finite = bool(torch.isfinite(total_norm))
    if finite:
        run.opt.step()
        state.bad_steps = 0
    else:
        state.bad_steps += 1
        log.warning("step %d: non-finite loss or gradient, update skipped", step)
        if state.bad_steps >= 3:
            run.opt.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"loss was non-finite for {state.bad_steps} steps in a row at step {step}; "
                                "lower --lr or use --dtype float32; the last checkpoint is untouched")
    run.opt.zero_grad(set_to_none=True)
    return finite


def _step_means(run: _Run, totals: _Totals) -> tuple[float, float | None, float | None]:
    """(training CE, reference CE or None, deterministic-gate CE or None), means over the micro-batches;
    with validation rows, the reference and deterministic CE are those of the step's validation batch."""
    n = run.tc.grad_accum
    if run.validation is not None:
        return totals.ce / n, totals.ref, totals.det
    return (totals.ce / n, totals.ref / n if run.reference is not None else None,
            totals.det / n if run.gc.gates == "deterministic" else None)


def _validation_ce(run: _Run, state: TrainerState, step: int, totals: _Totals) -> None:
    """The step's validation batch (rows cycled in order): the model's CE with deterministic gates and
    the dense model's, measured at step 0, on the same rows, into ``totals.det`` / ``totals.ref``. Every
    rank computes the whole batch, so all see the same figures."""
    n = len(run.validation)
    rows = [(step * run.tc.batch_size + i) % n for i in range(min(run.tc.batch_size, n))]
    ids, labels = run.validation.input_ids[rows].to(run.device), run.validation.labels[rows].to(run.device)
    with torch.no_grad(), deterministic_gates(run.model), evaluating(run.model), run.amp():
        logits = run.model(input_ids=ids).logits
        if run.gc.constraint == "kl":  # the teacher beside the student on the same rows
            totals.kl = float(next_token_kl(run.reference(input_ids=ids).logits, logits, labels))
    sums, counts = _row_ce(logits, labels)
    ref = state.validation_ref
    totals.det = float(sums.sum()) / float(counts.sum())
    totals.ref = sum(ref["ce_sum"][r] for r in rows) / sum(ref["tokens"][r] for r in rows)


def _kl(run: _Run, totals: _Totals) -> float | None:
    """The step's KL (geco.constraint "kl"): of the validation batch, else the mean over the micro-batches."""
    if run.gc.constraint != "kl":
        return None
    return totals.kl if run.validation is not None else totals.kl / run.tc.grad_accum


def _update_multiplier(run: _Run, state: TrainerState, geco: GecoState, step: int, totals: _Totals) -> GecoState:
    """Step 3 of the module docstring: the constrained CE against the target (or the reference's CE on the
    same rows plus the slack); with geco.constraint "kl", the KL to the dense model against the slack."""
    tc, gc = run.tc, run.gc
    settling = step >= tc.steps * (1.0 - gc.settle_fraction)
    slack = tolerance_at(step, tc.steps, tc.tolerance, gc)
    kl = _kl(run, totals)
    if kl is not None:
        return geco_update(geco, kl, slack, gc, settling=settling)
    ce, ref, det = _step_means(run, totals)
    constrained = ce if det is None else det
    if ref is None:
        return geco_update(geco, constrained, state.base_ce + slack, gc, settling=settling)
    return geco_update(geco, constrained - ref, slack, gc, settling=settling)  # the gap on these very rows


def _step_record(run: _Run, state: TrainerState, geco: GecoState, totals: _Totals, *, finite: bool,
                 elapsed: float, evaluate: bool) -> StepRecord:
    """The logged record of the step just done, with held-out CE and density when ``evaluate``."""
    tc = run.tc
    heldout = None
    if evaluate:
        heldout = measure(run.model, run.data.heldout, batch_size=run.eval_bs, max_batches=tc.eval_batches)
        run.model.train()
    ce, ref, det = _step_means(run, totals)
    rate = state.tokens_seen / max(elapsed, 1e-9)
    return StepRecord(
        step=state.step, ce=ce, tau=state.tau, beta=geco.beta, c_ma=geco.c_ma, reg=totals.reg / tc.grad_accum,
        density=totals.opened / max(totals.allowed, 1), lr=run.opt.param_groups[0]["lr"], tokens_per_s=rate,
        elapsed_s=elapsed, eta_s=(tc.steps - state.step) * run.tokens_per_step / max(rate, 1e-9),
        heldout_ce=heldout.ce if heldout else None, heldout_density=heldout.density if heldout else None,
        heldout_tau=(state.tau if state.eval_base_ce is None else state.eval_base_ce + tc.tolerance) if heldout
        else None, skipped=not finite, ref_ce=ref, det_ce=det, kl=_kl(run, totals),
        slack=tolerance_at(state.step - 1, tc.steps, tc.tolerance, run.gc))


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
    if (cfg.geco.reference == "batch" or cfg.geco.constraint == "kl") != (reference is not None):
        raise SpartanError("geco.reference 'batch' and geco.constraint 'kl' need a reference model, and only they "
                           "do; pass reference= with the dense base model, or use geco.reference 'heldout'")
    tc = cfg.train
    if cfg.geco.reference == "validation":
        data = validation_split(data, tc.batch_size)
    run = _setup(model, data, cfg, reference, resume)
    state = resume if resume is not None else _initial_state(model, data, cfg, run.eval_bs)
    t_start = time.perf_counter() - state.elapsed_s
    interrupted = False
    geco = state.geco

    def snapshot() -> TrainerState:
        state.geco = geco
        state.optimizer = distributed.optimizer_state(run.opt, run.world)  # full moments, whatever the wrapper
        state.rng = _rng_state()
        state.elapsed_s = time.perf_counter() - t_start
        return state

    model.train()
    with no_dropout(model), recording(model):
        while state.step < tc.steps:
            if should_stop is not None and distributed.any_across(should_stop(), run.world, run.device):
                interrupted = True  # every rank stops after the same step
                break
            step = state.step
            for group in run.opt.param_groups:
                group["lr"] = tc.lr * _lr_factor(step, tc)
            totals = _Totals()
            finite = all(_micro_step(run, step, a, geco.beta, totals) for a in range(tc.grad_accum))
            finite = _apply_update(run, state, step, finite)
            if finite:
                if run.validation is not None:
                    _validation_ce(run, state, step, totals)
                geco = _update_multiplier(run, state, geco, step, totals)
            state.step = step + 1
            state.tokens_seen += run.tokens_per_step
            done = state.step >= tc.steps
            evaluate_now = done or bool(tc.eval_every and state.step % tc.eval_every == 0)
            if on_step is not None and (evaluate_now or state.step == 1 or state.step % tc.log_every == 0 or not finite):
                on_step(_step_record(run, state, geco, totals, finite=finite, elapsed=time.perf_counter() - t_start,
                                     evaluate=evaluate_now))
            if on_checkpoint is not None and tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and not done:
                on_checkpoint(snapshot())
    model.eval()
    for s in run.states:
        s.generator = None  # the row streams fit this run's batch only
    final = measure(model, data.heldout, batch_size=run.eval_bs)
    snap = snapshot()
    result = SparsifyResult(
        steps=state.step, base_ce=state.base_ce, tau=state.tau, step0_density=state.step0_density,
        heldout_ce=final.ce, density=final.density, beta=geco.beta, infeasible=geco.infeasible,
        interrupted=interrupted, tokens_per_s=state.tokens_seen / max(snap.elapsed_s, 1e-9),
        elapsed_s=snap.elapsed_s, density_per_head=final.density_per_head.tolist(),
    )
    return result, snap
