"""A sparsify run: model + data + gates + trainer + checkpoint directory, resumable.

This is what ``spartan sparsify`` calls (and ``spartan_cli.sparsify_run`` from Python):
1. Check the output directory (empty, ``overwrite`` or ``resume``) before any work.
2. Load the model (or, to resume, the checkpoint and its trainer state) and the data.
3. Attach gates, train with GECO, save resumable checkpoints on the way and when stopped.
4. Measure the final held-out CE and density (deterministic gates) and the task metrics of
   built-in models; write the final checkpoint with them in spartan.json, and trajectory.png (density,
   CE against the target and beta over the steps, from train_log.jsonl).
Under torchrun / accelerate launch every rank runs this; only rank 0 writes files and reports progress
(distributed.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spartan_cli.config import GateConfig, GecoConfig, TrainConfig, to_jsonable
from spartan_cli.errors import ConfigError
from spartan_cli.training import lora as lora_mod

log = logging.getLogger(__name__)

SECTIONS = ("model", "out", "data", "gate", "geco", "train", "trust_remote_code")


@dataclass(frozen=True)
class RunConfig:
    model: str
    out: str
    data: dict | None = None  # spartan_cli.data.DataConfig fields; None for built-in models
    gate: GateConfig = field(default_factory=GateConfig)
    geco: GecoConfig = field(default_factory=GecoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.data is not None and not isinstance(self.data, dict):
            raise ConfigError(f"config section 'data' must be a mapping of settings, got {type(self.data).__name__}: "
                              f"{self.data!r}")
        from spartan_cli.builtin import NAMES

        if self.model in NAMES and self.data:
            raise ConfigError(f"the built-in {self.model} model brings its own data; drop --data")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {', '.join(map(repr, unknown))}; "
                              f"valid sections are {', '.join(SECTIONS)}")
        for key in ("model", "out"):
            if not d.get(key):
                raise ConfigError(f"{key} is required (give it as an argument/option or in the config file)")
        return cls(
            model=str(d["model"]), out=str(d["out"]), data=d.get("data"),
            gate=GateConfig.from_dict(d.get("gate")), geco=GecoConfig.from_dict(d.get("geco")),
            train=TrainConfig.from_dict(d.get("train")), trust_remote_code=bool(d.get("trust_remote_code", False)),
        )

    def to_dict(self) -> dict:
        return to_jsonable(self)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two config dicts (override wins); inputs are not changed."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@dataclass(frozen=True)
class RunResult:
    summary: dict  # the JSON summary printed by --json and stored as spartan.json "final"
    out: Path
    interrupted: bool


def check_out_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if resume:
        if not out.is_dir():
            raise ConfigError(f"--resume given but {str(out)!r} does not exist; drop --resume to start a new run")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --resume to continue its run, "
                          "--overwrite to replace it, or choose another --out")


def _load_data(cfg: RunConfig, tokenizer, model):
    from spartan_cli.hf.models import model_shape

    from spartan_cli import builtin

    if cfg.model in builtin.NAMES:
        return builtin.module(cfg.model).splits()  # the split the dense model was trained on
    if not cfg.data or not cfg.data.get("source"):
        raise ConfigError(f"model {cfg.model!r} needs training text: pass --data FILE|DIR|HUB_DATASET")
    from spartan_cli.data import DataConfig, load_blocks

    data_cfg = DataConfig.from_dict(cfg.data)
    return load_blocks(data_cfg, tokenizer, max_positions=model_shape(model).max_positions)


def _lora_model(cfg: RunConfig, load_model, attach_gates):
    """(model with gates and fresh LoRA adapters, tokenizer, source) for a ``train.lora_rank`` run."""
    model, tokenizer, source = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    attach_gates(model, cfg.gate)
    targets = None if cfg.train.lora_targets is None else [t.strip() for t in cfg.train.lora_targets.split(",")
                                                          if t.strip()]
    lora_mod.add_lora(model, cfg.train.lora_rank, cfg.train.lora_alpha, targets, seed=cfg.train.seed)
    return model, tokenizer, source


def task_metrics(model_name: str, model) -> dict:
    """Metrics of a built-in model's own task (addition: exact match; shakespeare: text CE, induction)."""
    from spartan_cli import builtin

    return builtin.module(model_name).task_metrics(model) if model_name in builtin.NAMES else {}


def run_sparsify(
    cfg: RunConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable | None = None,
    on_event: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    command: str | None = None,
) -> RunResult:
    import yaml

    from spartan_cli.training import checkpoint, distributed
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.hf.models import load_model
    from spartan_cli.training.train import SparsifyConfig, resolve_device, sparsify

    out = Path(cfg.out)
    check_out_dir(out, overwrite=overwrite, resume=resume)
    device = resolve_device(cfg.train.device)
    world = distributed.init_from_env(device.type)
    distributed.check_batch(cfg.train.batch_size, world)  # before any loading
    distributed.barrier(world)  # every rank has checked --out before rank 0 writes into it
    main = world.is_main
    say = (on_event or (lambda msg: log.info(msg))) if main else (lambda msg: None)
    if not main:
        on_step = None

    lora = cfg.train.lora_rank > 0
    state = None
    if resume:
        prior = checkpoint.read_meta(out)
        state = checkpoint.load_trainer_state(out)
        say(f"resuming {out} from step {state.step}")
        if prior.get("base_model_name") != cfg.model:
            raise ConfigError(f"--resume: {str(out)!r} was trained from {prior.get('base_model_name')!r}, "
                              f"not {cfg.model!r}; pass the same model")
        if lora:  # the frozen base again from its source, the saved adapter put back: nothing merged is undone
            model, tokenizer, source = _lora_model(cfg, load_model, attach_gates)
            lora_mod.load_adapter(model, out)
        else:
            model, tokenizer = checkpoint.load(out)
            source = prior["base_model"]
    else:
        say(f"loading model {cfg.model}")
        if lora:
            model, tokenizer, source = _lora_model(cfg, load_model, attach_gates)
        else:
            model, tokenizer, source = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
            attach_gates(model, cfg.gate)
    distributed.place(model, device, world, cfg.train.parallel)  # whole, or this rank's FSDP shards
    splits = _load_data(cfg, tokenizer, model)
    say(f"data: {len(splits.train)} training blocks, {len(splits.heldout)} held-out blocks of {splits.train.seq_len} tokens")

    log_path = out / checkpoint.TRAIN_LOG
    if main:  # rank 0 owns the directory
        out.mkdir(parents=True, exist_ok=True)
        if resume and log_path.exists():  # drop lines written after the checkpoint we resume from
            kept = [ln for ln in log_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= state.step]
            checkpoint.atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
        elif log_path.exists():
            log_path.unlink()
    run_yaml = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    base_meta = {"base_model": source, "base_model_name": cfg.model, "gate": cfg.gate.to_dict(),
                 "geco": cfg.geco.to_dict(), "train": cfg.train.to_dict(), "data": cfg.data, "command": command,
                 "processes": world.size}

    def log_step(rec):
        if not main:
            return
        with open(log_path, "a") as f:
            f.write(json.dumps(dataclasses.asdict(rec)) + "\n")
        if on_step is not None:
            on_step(rec)

    def save_state(st, final: dict | None = None):
        weights = distributed.full_state_dict(model, world)  # FSDP: every rank joins the gather; else None
        if not main:  # rank 0 writes every checkpoint
            return
        meta = {**base_meta, "target_loss": st.tau, "base_ce": st.base_ce, "step": st.step,
                "step0_density": st.step0_density, "final": final}
        adapter = None
        if lora:  # the merged model for every reader, and the adapter alone
            weights, adapter = lora_mod.merged_state_dict(model), lora_mod.adapter_files(model)
        checkpoint.save(out, model, tokenizer, meta=meta, run_config_yaml=run_yaml, trainer_state=st,
                        state_dict=weights, adapter=adapter)

    reference = None
    if (cfg.geco.reference == "batch" or cfg.geco.constraint == "kl") and lora:
        reference = lora_mod.DenseView(model)  # the student with adapters off and gates open: no second copy
    elif cfg.geco.reference == "batch" or cfg.geco.constraint == "kl":  # the dense base, frozen, beside the
        # student (resume loads it afresh)
        say("loading the dense reference model")
        reference, _, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
        reference.to(device).requires_grad_(False)
    scfg = SparsifyConfig(gate=cfg.gate, geco=cfg.geco, train=cfg.train)
    result, final_state = sparsify(model, splits, scfg, on_step=log_step, on_checkpoint=save_state,
                                   should_stop=should_stop, resume=state, reference=reference)
    summary: dict[str, Any] = {
        "schema_version": checkpoint.SCHEMA_VERSION,
        "model": cfg.model, "out": str(out), "steps": result.steps, "interrupted": result.interrupted,
        "base_ce": result.base_ce, "target_loss": result.tau, "tolerance": cfg.train.tolerance,
        "ce": result.heldout_ce, "ce_minus_target": result.heldout_ce - result.tau,
        "within_tolerance": result.heldout_ce <= result.tau + 1e-9,
        "density": result.density, "step0_density": result.step0_density,
        "beta": result.beta, "infeasible": result.infeasible,
        "tokens_per_s": result.tokens_per_s, "elapsed_s": result.elapsed_s,
        "density_per_head": result.density_per_head,
    }
    if not result.interrupted:  # on every rank: a sharded model's forward needs them all
        say("measuring task metrics")
        summary.update(task_metrics(cfg.model, model))
    save_state(final_state, final=summary)
    if main and log_path.exists():
        from spartan_cli.measure import plots

        records = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln]
        if records:
            plots.trajectory(records, out / checkpoint.TRAJECTORY, title=f"spartan sparsify {cfg.model}")
    distributed.barrier(world)  # the final checkpoint is written before any rank returns
    return RunResult(summary=summary, out=out, interrupted=result.interrupted)

