"""Evaluate a sparse checkpoint (or any model) side by side with the base model it came from.

``evaluate_run(cfg)``, what ``spartan evaluate`` calls:
1. Load the subject: a spartan checkpoint (gated; gates deterministic, 1[g > 0]) or a plain HF model /
   hub id / built-in (dense).
2. Resolve the held-out data (`eval_data`): ``--data`` (every block of that text); else the checkpoint's
   own held-out blocks, rebuilt from the data config stored in spartan.json; else, for the built-in
   ``addition`` model, its 1,000 held-out problems (answer digits scored).
3. Score the subject: token-weighted CE (nats per scored token) and perplexity, batched under no_grad
   in eval mode (`measure`), plus the deterministic density for gated models, and the task's metrics
   (``--task``; the built-in addition model defaults to the ``addition`` task).
4. Free it, load the base model (spartan.json ``base_model``, or ``--baseline``), check it tokenises the
   same way, and score it on the same blocks and task.
Only one model is in memory at a time.

Report metrics (beside the header of report.py):
  model     {name, gated, ce, perplexity, tokens, sequences, density, task}   the evaluated model
  base      the same fields for the base model, or null
  ce_gap    model.ce - base.ce (nats), or null
  data      {source, split, blocks, seq_len, scored_tokens_per_block}
``task`` is null or {task, metrics: {name: {value, examples, description}}}.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from spartan_cli.errors import ConfigError, DataError
from spartan_cli.hf.subjects import Subject, base_model_name, load_subject_and_task, swap_for_base
from spartan_cli.progress import Progress
from spartan_cli.tasks import TaskResult

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class EvalData:
    """The blocks CE is measured on, and where they came from."""

    blocks: Any  # TokenBlocks (batch, pos)
    source: str  # a path/hub name, or builtin:NAME
    split: str  # "heldout" (the checkpoint's own held-out blocks) | "all" (every block of --data)
    config: dict  # resolved data settings, for the report

    def to_dict(self) -> dict:
        scored = int((self.blocks.labels[:, 1:] != -100).sum()) / max(len(self.blocks), 1)
        return {"source": self.source, "split": self.split, "blocks": len(self.blocks),
                "seq_len": self.blocks.seq_len, "scored_tokens_per_block": scored, "config": self.config}


@dataclass(frozen=True)
class Scores:
    """One model's numbers."""

    name: str
    gated: bool  # True: deterministic gates (sparse); False: dense attention
    ce: float | None  # nats per scored token; None when no data was given (task only)
    tokens: int
    sequences: int
    density: float | None  # open deterministic gates / allowed pairs; None for dense models
    task: TaskResult | None = None

    @property
    def perplexity(self) -> float | None:
        return None if self.ce is None else math.exp(min(self.ce, 700.0))

    def to_dict(self) -> dict:
        return {"name": self.name, "gated": self.gated, "ce": self.ce, "perplexity": self.perplexity,
                "tokens": self.tokens, "sequences": self.sequences, "density": self.density,
                "task": None if self.task is None else self.task.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Scores":
        return cls(name=d["name"], gated=d["gated"], ce=d["ce"], tokens=d["tokens"], sequences=d["sequences"],
                   density=d["density"], task=None if d.get("task") is None else TaskResult.from_dict(d["task"]))


@dataclass(frozen=True)
class EvalResult:
    model: Scores
    base: Scores | None
    data: dict | None  # EvalData.to_dict(), None when only a task was evaluated

    @property
    def ce_gap(self) -> float | None:
        if self.base is None or self.model.ce is None or self.base.ce is None:
            return None
        return self.model.ce - self.base.ce

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "base": None if self.base is None else self.base.to_dict(),
                "ce_gap": self.ce_gap, "data": self.data}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        return cls(model=Scores.from_dict(d["model"]), base=None if d["base"] is None else Scores.from_dict(d["base"]),
                   data=d.get("data"))


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of ``spartan evaluate``."""

    model: str  # checkpoint directory, HF directory, hub id or built-in name
    data: str | None = None  # text to measure CE on (every block); None: the checkpoint's held-out blocks
    seq_len: int | None = None  # block length for --data; None: the checkpoint's, else min(128, context)
    text_field: str = "text"  # field of .jsonl/.parquet rows holding the text
    task: str | None = None  # task name (tasks.TASKS); None: the built-in model's own task, if any
    baseline: str | None = None  # base model to compare with; None: spartan.json base_model
    compare_base: bool = True  # False: score the subject only
    batch_size: int = 8
    max_batches: int | None = None  # cap on CE batches per model (None: all held-out blocks)
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self):
        from spartan_cli.config import check_batching

        check_batching(self.batch_size, self.max_batches)
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluateConfig":
        from spartan_cli.config import strict_from_dict

        return strict_from_dict(cls, d, where="evaluate")


# ------------------------------------------------------------------------------------------ loading


# --------------------------------------------------------------------------------------------- data
def _builtin_heldout(name: str):
    from spartan_cli import builtin

    if name in builtin.NAMES:
        return builtin.module(name).heldout_blocks()  # what the dense model never saw
    raise DataError(f"built-in model {name!r} has no held-out data; pass --data FILE")


def eval_data(subject: Subject, *, data: str | None = None, seq_len: int | None = None, text_field: str = "text",
              max_tokens: int | None = None) -> EvalData | None:
    """The blocks to measure ``subject`` on (see module docstring, step 2); None if there are none."""
    from spartan_cli.data import DataConfig, load_blocks, pack_tokens, read_texts, tokenize_texts
    from spartan_cli.hf.models import model_shape

    max_positions = model_shape(subject.model).max_positions
    stored = (subject.meta or {}).get("data")
    if data is None:
        if subject.builtin is not None:
            blocks = _builtin_heldout(subject.builtin)
            return EvalData(blocks, f"builtin:{subject.builtin}", "heldout", {"builtin": subject.builtin})
        if not stored:
            return None
        cfg = DataConfig.from_dict(stored)
        if seq_len is not None and seq_len != cfg.seq_len:
            raise ConfigError(f"--seq-len {seq_len} differs from the checkpoint's held-out blocks ({cfg.seq_len} "
                              "tokens); drop --seq-len, or pass --data to measure other text")
        blocks = load_blocks(cfg, subject.tokenizer, max_positions=max_positions).heldout
        return EvalData(blocks, cfg.source, "heldout", cfg.to_dict())
    if subject.builtin is not None:
        raise ConfigError(f"the built-in {subject.builtin} model brings its own data; drop --data")
    if seq_len is None:
        seq_len = (stored or {}).get("seq_len") or min(128, max_positions or 128)
    if max_positions is not None and seq_len > max_positions:
        raise DataError(f"seq_len {seq_len} exceeds the model's max_positions {max_positions}; "
                        f"use --seq-len {max_positions} or less")
    cfg = DataConfig(source=data, text_field=text_field, seq_len=seq_len)
    ids = tokenize_texts(read_texts(cfg), subject.tokenizer, max_tokens=max_tokens)  # (n_tokens,)
    if ids.numel() < seq_len:
        raise DataError(f"'{data}' gave {ids.numel()} tokens, fewer than one block of seq_len {seq_len}; "
                        "pass more text or a smaller --seq-len")
    blocks = pack_tokens(ids, seq_len)
    return EvalData(blocks, data, "all", {"source": data, "text_field": text_field, "seq_len": seq_len,
                                           "max_tokens": max_tokens})


# -------------------------------------------------------------------------------------------- verbs


def score(model, blocks=None, *, name: str = "model", task=None, task_data=None, batch_size: int = 8,
          max_batches: int | None = None, on_progress: Callable[[Progress], None] | None = None) -> Scores:
    """CE (and density, if gated) of ``model`` on ``blocks`` (batch, pos), plus ``task``'s metrics on
    ``task_data`` (``task.build(tokenizer)``).

    Batches are measured one at a time (no grad, eval mode, deterministic gates) and combined
    token-weighted, so memory is one batch's activations.
    """
    from spartan_cli.gating.attention import is_gated
    from spartan_cli.measure.heldout import measure

    gated = is_gated(model)
    ce = density = None
    tokens = sequences = 0
    if blocks is not None:
        n_batches = math.ceil(len(blocks) / batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        nll, open_pairs, allowed = 0.0, None, 0
        for i in range(n_batches):
            m = measure(model, blocks.slice(i * batch_size, (i + 1) * batch_size), batch_size=batch_size)
            nll += m.ce * m.tokens
            tokens += m.tokens
            sequences += m.sequences
            if m.open_pairs is not None:
                open_pairs = m.open_pairs if open_pairs is None else open_pairs + m.open_pairs  # (n_layers, n_heads)
                allowed += m.allowed_pairs
            if on_progress is not None:
                on_progress(Progress(f"CE of {name}", i + 1, n_batches))
        ce = nll / max(tokens, 1)
        if gated and open_pairs is not None:
            density = float(open_pairs.sum()) / (open_pairs.numel() * max(allowed, 1))
    result = None
    if task is not None:
        if on_progress is not None:
            on_progress(Progress(f"task {task.name} on {name}", 0, None))
        result = task.score(model, task_data)
    return Scores(name=name, gated=gated, ce=ce, tokens=tokens, sequences=sequences, density=density, task=result)


@dataclass(frozen=True)
class EvaluateRun:
    """What ``evaluate_run`` did: the numbers and the resolved settings (for the report's config)."""

    result: EvalResult
    config: dict = field(default_factory=dict)


def evaluate_run(cfg: EvaluateConfig, *, on_progress: Callable[[Progress], None] | None = None) -> EvaluateRun:
    """Steps 1-4 of the module docstring."""

    say = on_progress or (lambda p: log.info(p.stage))
    subject, task, device = load_subject_and_task(cfg, say)
    # built once, with the subject's tokenizer (the base must tokenise identically, load_base checks);
    # a tokenizer that cannot express the task fails here, before any scoring
    task_data = task.build(subject.tokenizer) if task is not None else None
    base_name = base_model_name(subject, cfg.baseline) if cfg.compare_base else None
    max_tokens = None
    if cfg.max_batches is not None and cfg.data is not None:  # read no more text than the batches will use
        seq = cfg.seq_len or ((subject.meta or {}).get("data") or {}).get("seq_len") or 128
        max_tokens = cfg.max_batches * cfg.batch_size * seq
    data = eval_data(subject, data=cfg.data, seq_len=cfg.seq_len, text_field=cfg.text_field, max_tokens=max_tokens)
    if data is None and task is None:
        raise ConfigError(f"nothing to evaluate {cfg.model!r} on: it stores no data config; pass --data FILE "
                          "and/or --task T")
    blocks = data.blocks if data is not None else None
    kwargs = dict(task=task, task_data=task_data, batch_size=cfg.batch_size, max_batches=cfg.max_batches,
                  on_progress=on_progress)
    model_scores = score(subject.model, blocks, name=cfg.model, **kwargs)

    base_scores = None
    if base_name is not None:
        subject, base = swap_for_base(subject, base_name, device=device, trust_remote_code=cfg.trust_remote_code,
                                      say=say)
        base_scores = score(base, blocks, name=base_name, **kwargs)
    resolved = {**cfg.to_dict(), "task": None if task is None else task.name, "baseline": base_name,
                "device": str(device)}
    return EvaluateRun(EvalResult(model=model_scores, base=base_scores, data=None if data is None else data.to_dict()),
                       config=resolved)
