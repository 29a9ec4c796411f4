"""Frozen configuration dataclasses, one per concern, composed into one run config.

Every config has a strict ``from_dict`` (unknown keys are rejected with the valid ones named) and a
``to_dict``; validation lives in ``__post_init__`` and names the field and the bad value. Precedence
(defaults < config file < flags) is decided in the CLI by where a value came from, never by truthiness.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from spartan_cli.training.distributed import PARALLEL  # torch-free at import
from spartan_cli.errors import ConfigError


def strict_from_dict(cls, data: Mapping[str, Any] | None, *, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming the valid ones."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__} settings must be a mapping of keys to values, "
                          f"got {type(data).__name__}: {data!r}")
    data = dict(data or {})
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(sorted(valid))}"
        )
    return cls(**data)


def check_types(obj, section: str) -> None:
    """ConfigError unless every field of dataclass ``obj`` holds what its annotation says: int, a finite
    float, str or bool (``| None`` allows None). Config files and Python callers bypass click's types."""
    for f in fields(obj):
        value, kind = getattr(obj, f.name), str(f.type).replace(" ", "")
        if value is None and kind.endswith("|None"):
            continue
        base = kind.split("|")[0]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": number and math.isfinite(value),
              "str": isinstance(value, str), "bool": isinstance(value, bool)}.get(base, True)
        if not ok:
            expected = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}
            raise ConfigError(f"{section}.{f.name} must be {expected[base]}, got {value!r}")


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}")


class Section:
    """A config section: ``to_dict`` its fields, ``from_dict`` refuses unknown keys, naming the section."""

    where: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return strict_from_dict(cls, d, where=cls.where)


@dataclass(frozen=True)
class GateConfig(Section):
    """How attention gates are computed (docs/method.md, 'Gated attention')."""

    where = "gate"

    kind: str = "paper"  # registered gate kind (gates.GATE_KINDS)
    bias: float = 2.0  # b in g_ij = q_i.k_j / sqrt(d_head) + b; fixed, not learned

    def __post_init__(self):
        from spartan_cli.gating.gates import GATE_KINDS

        check_types(self, "gate")
        if self.kind not in GATE_KINDS:
            raise ConfigError(f"gate kind {self.kind!r} is unknown; choose one of {', '.join(sorted(GATE_KINDS))}")



REFERENCES = ("heldout", "batch", "validation")  # GecoConfig.reference
CONSTRAINTS = ("ce", "kl")  # GecoConfig.constraint  # GecoConfig.reference
CONSTRAINED_GATES = ("sampled", "deterministic")  # GecoConfig.gates


@dataclass(frozen=True)
class GecoConfig(Section):
    """The GECO multiplier on the sparsity term: loss = CE + beta * R (docs/method.md)."""

    where = "geco"

    beta_init: float = 1e-3  # beta at step 0 (sparsity pressure starts near zero)
    beta_min: float = 1e-6  # floor: beta pinned here while CE > target means the target looks infeasible
    beta_max: float = 1e4  # ceiling, so beta cannot run away
    rate: float = 0.05  # alpha: log-space ascent step per unit of relative constraint (CE - tau) / scale
    max_log_step: float = 0.05  # clamp on |delta log beta| per step, so sparsity never moves abruptly
    smoothing: float = 0.99  # m in c_ma = m * c_ma + (1 - m) * (CE - tau)
    warmup_steps: int = 50  # beta is held at beta_init this long while the model adapts to sampled gates
    scale: float | None = None  # divides CE - tau; None: 0.05 nats (geco.DEFAULT_SCALE)
    settle_fraction: float = 0.1  # last share of steps in which beta may only fall, so the run ends feasible
    # what the step's CE is held against: "heldout" = tau (base CE on the held-out blocks + tolerance);
    # "batch" = the dense base model's CE on the same training rows + tolerance (a frozen copy of the base
    # runs beside the student; removes batch-to-batch noise and any train/held-out gap of the base);
    # "validation" = the deterministic-gate CE of rows never trained on, minus the dense model's CE on the
    # same rows (measured once at step 0): training rows understate the gap as the model fits them
    reference: str = "heldout"
    # which gates the constrained CE is measured with: "sampled" = the training forward's own CE; or
    # "deterministic" = one more no-grad forward of the step's rows with 1[g > 0], the gates every
    # measurement and the shipped model use (sampling noise alone can cost more than the tolerance)
    gates: str = "sampled"
    # slack the constraint starts with (nats), narrowed linearly to the run's tolerance by the start of the
    # settle phase: the model first sparsifies at a loose target, then buys the loss back at the density it
    # reached. None: the tolerance holds from step 0.
    tolerance_start: float | None = None
    # what is trained and held to the tolerance: "ce" = the cross-entropy against the data's next tokens
    # (the gap to the dense model's, per ``reference``); "kl" = KL(dense || sparse) of the next-token
    # distributions, the dense model a frozen copy beside the student, trained on as the loss (distillation)
    # and held below the tolerance itself (0 for the dense model), on the training rows ("batch") or the
    # validation rows ("validation")
    constraint: str = "ce"

    def __post_init__(self):
        check_types(self, "geco")
        _positive("geco.beta_init", self.beta_init)
        _positive("geco.beta_min", self.beta_min)
        _positive("geco.rate", self.rate, allow_zero=True)
        _positive("geco.max_log_step", self.max_log_step)
        _positive("geco.warmup_steps", self.warmup_steps, allow_zero=True)
        if not self.beta_min <= self.beta_init <= self.beta_max:
            raise ConfigError(
                f"geco.beta_init must lie in [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}], "
                f"got {self.beta_init}"
            )
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"geco.smoothing must be in [0, 1), got {self.smoothing!r}")
        if self.scale is not None:
            _positive("geco.scale", self.scale)
        if not 0.0 <= self.settle_fraction < 1.0:
            raise ConfigError(f"geco.settle_fraction must be in [0, 1), got {self.settle_fraction!r}")
        if self.tolerance_start is not None:
            _positive("geco.tolerance_start", self.tolerance_start, allow_zero=True)
        if self.gates not in CONSTRAINED_GATES:
            raise ConfigError(f"geco.gates must be one of {', '.join(CONSTRAINED_GATES)}, got {self.gates!r}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"geco.reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"geco.constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if self.constraint == "kl" and self.reference == "heldout":
            raise ConfigError("geco.constraint 'kl' is read against the dense model on the same rows; use "
                              "--geco-reference batch or validation with it")



TRAINABLE = ("all", "attention")  # which weights train: everything, or the attention projections only
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class TrainConfig(Section):
    """The optimisation loop around the Lagrangian."""

    where = "train"

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    schedule: str = "cosine"  # constant | cosine | linear (decay after warm-up)
    lr_warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    tolerance: float = 0.0  # nats added to the measured base loss to make the target tau
    trainable: str = "all"
    seed: int = 0
    device: str = "auto"  # auto: cuda if present, else cpu
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu; gate maths is always fp32
    log_every: int = 10
    eval_every: int = 200  # held-out deterministic CE/density every this many steps (0: only at the end)
    # held-out batches per periodic evaluation; None: every held-out block (the rows the target is measured
    # on). A cap evaluates the first batches and compares them with the dense CE on those same batches
    eval_batches: int | None = None
    checkpoint_every: int = 500  # resumable checkpoint every this many steps (0: only at the end)
    parallel: str = "ddp"  # how ranks hold the model under torchrun/accelerate: ddp | fsdp (distributed.PARALLEL)
    # LoRA (training.lora): adapters of this rank train instead of the weights (0: off), scale alpha / rank
    lora_rank: int = 0
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: str | None = None  # comma-separated module-name endings; None: the attention projections

    def __post_init__(self):
        check_types(self, "train")
        _positive("train.lora_rank", self.lora_rank, allow_zero=True)
        if self.lora_alpha is not None:
            _positive("train.lora_alpha", self.lora_alpha)
        if not self.lora_rank and (self.lora_targets is not None or self.lora_alpha is not None):
            raise ConfigError("train.lora_targets / lora_alpha set without train.lora_rank; pass --lora-rank R")
        if self.lora_rank and self.trainable != "all":
            raise ConfigError(f"train.trainable {self.trainable!r} with train.lora_rank: LoRA trains its adapters "
                              "only; drop --trainable (choose the adapted layers with --lora-targets)")
        if self.lora_rank and self.parallel == "fsdp":
            raise ConfigError("train.lora_rank with train.parallel 'fsdp' is not supported; use ddp (the adapters "
                              "are small: each rank holds the frozen model and its adapters)")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.lr", self.lr)
        for name in ("lr_warmup_steps", "weight_decay", "grad_clip", "tolerance", "eval_every", "checkpoint_every"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.eval_batches is not None:
            _positive("train.eval_batches", self.eval_batches)
        for name, allowed in (("schedule", SCHEDULES), ("trainable", TRAINABLE), ("dtype", DTYPES),
                              ("parallel", tuple(sorted(PARALLEL)))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")



def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON run config -> dict (sections: model, data, gate, geco, train, out)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML or JSON file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"config file {str(path)!r} is not valid YAML/JSON: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def check_batching(batch_size: int, max_batches: int | None) -> None:
    """ConfigError unless batch_size >= 1 and max_batches is None or >= 1."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"max_batches must be >= 1, got {max_batches!r}")
