"""Train the built-in dense ``addition`` model from scratch and save it as a Hugging Face directory.

    python -m spartan_cli.builtin.make_addition --out spartan_cli/builtin/addition

Steps:
  1. Split the 10,000 problems with ``addition.split_pairs()`` (seed 0, 1,000 held out); train only on
     the 9,000 train pairs.
  2. Build the tokenizer and a fresh ``GPT2LMHeadModel`` (``addition.build_config``), seeded.
  3. AdamW with linear warmup then cosine decay to 0; each step draws a batch of train pairs from an
     epoch-wise seeded shuffle; the loss is Hugging Face's CE on the five answer digits only.
  4. Every ``--eval-every`` steps, log exact match on all 10,000 and on the 1,000 held-out problems.
  5. Save model + tokenizer + README.md to a temporary directory beside ``--out``, then swap it into
     place with ``os.replace``, so an interrupted run never leaves a half-written model.

Deterministic for a given seed, thread count and torch build (CPU). Progress goes to stderr via logging.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spartan_cli.builtin import addition
from spartan_cli.errors import ConfigError

log = logging.getLogger("spartan_cli.builtin.make_addition")


def check_schedule_and_shape(s) -> None:
    """ConfigError unless the counts and sizes of pretraining settings ``s`` are positive and
    0 <= warmup < steps (shared by the built-in models' training scripts)."""
    for name in ("steps", "batch_size", "eval_every", "threads", "n_layer", "n_head", "n_embd"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}={getattr(s, name)!r}: expected a positive integer")
    if not 0 <= s.warmup < s.steps:
        raise ConfigError(f"warmup={s.warmup!r}: expected 0 <= warmup < steps ({s.steps})")


@dataclass(frozen=True)
class TrainSettings:
    """How the dense addition model is trained (defaults = the shipped model)."""

    seed: int = 0
    steps: int = 3000  # optimiser steps (exact match reaches 1.0 on all 10,000 by step ~1750; the rest is margin)
    batch_size: int = 256  # problems per step
    lr: float = 1e-3  # peak learning rate
    warmup: int = 200  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled decay on matrices (not biases / LayerNorm)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    eval_every: int = 250
    threads: int = 2  # torch intra-op threads (the result depends on it only in the last bits)

    def __post_init__(self):
        check_schedule_and_shape(self)
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr={self.lr!r}, weight_decay={self.weight_decay!r}: expected lr > 0, weight_decay >= 0")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd!r} must be divisible by n_head={self.n_head!r}")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    exact_all: float  # exact match on all 10,000 problems
    exact_train: float  # on the 9,000 train pairs
    exact_heldout: float  # on the 1,000 held-out pairs


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup to ``s.lr`` over ``s.warmup`` steps, then cosine decay to 0 at ``s.steps``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(model, opt, lr: float, grad_clip: float, **inputs) -> float:
    """One pretraining step: the learning rate set, the loss of ``model(**inputs)``, its backward, the
    gradient clipped to ``grad_clip``, the update applied -> the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(**inputs).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def train(s: TrainSettings):
    """Train a fresh model; returns ``(model, tokenizer, TrainResult)``."""
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    train_pairs, held_pairs = addition.split_pairs()
    data = addition.blocks(train_pairs)  # (9000, 11)
    tokenizer = addition.build_tokenizer()
    model = GPT2LMHeadModel(addition.build_config(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd))
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr,
        betas=s.betas,
    )
    gen = torch.Generator().manual_seed(s.seed)
    order = torch.randperm(len(data), generator=gen)  # (9000,)
    cursor = 0
    t0 = time.perf_counter()
    loss_avg = float("nan")
    for step in range(s.steps):
        if cursor + s.batch_size > len(order):  # new epoch: fresh shuffle, drop the ragged tail
            order, cursor = torch.randperm(len(data), generator=gen), 0
        idx = order[cursor : cursor + s.batch_size]  # (batch,)
        cursor += s.batch_size
        loss = optimizer_step(model, opt, lr_at(step, s), s.grad_clip, input_ids=data.input_ids[idx],
                              labels=data.labels[idx])
        loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  exact all %.4f  held-out %.4f  (%.0fs)",
                step + 1, s.steps, loss_avg, lr_at(step, s),
                addition.exact_match(model), addition.exact_match(model, held_pairs),
                time.perf_counter() - t0,
            )  # fmt: skip
    seconds = time.perf_counter() - t0
    model.eval()
    result = TrainResult(
        steps=s.steps,
        seconds=seconds,
        final_loss=loss_avg,
        exact_all=addition.exact_match(model),
        exact_train=addition.exact_match(model, train_pairs),
        exact_heldout=addition.exact_match(model, held_pairs),
    )
    return model, tokenizer, result


def readme(s: TrainSettings, r: TrainResult, n_params: int) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in asdict(s).items())
    return f"""# Built-in `addition` model

The paper's toy case study: a {s.n_layer}-layer GPT-2 ({s.n_head} heads, d_model {s.n_embd}, {n_params:,}
parameters, fp32) trained on two-digit addition, 11 character tokens `a a + b b = c c c c c`, e.g.
`53+21=00074`. Vocabulary: `0`..`9` = ids 0..9, `+` = 10, `=` = 11, `<pad>` = 12 (pad only; never in a
problem); no BOS/EOS, no unknown token.

Made with

    python -m spartan_cli.builtin.make_addition --out spartan_cli/builtin/addition

on CPU ({s.threads} threads): {r.steps} AdamW steps of {s.batch_size} problems, warmup + cosine schedule,
loss on the five answer digits only, {r.seconds:.0f} s. Trained on the 9,000 train pairs of
`addition.split_pairs()` (seed 0); the 1,000 held-out pairs were never seen.

Exact match (all five answer digits right; equals greedy decoding):

| problems | exact match |
|---|---|
| all 10,000 | {r.exact_all:.4f} |
| 9,000 train | {r.exact_train:.4f} |
| 1,000 held out | {r.exact_heldout:.4f} |

Final training loss (EMA, per answer digit): {r.final_loss:.2e}.

Settings: {settings}.
"""


def save(model, tokenizer, text: str, out: Path, *, extra=None) -> None:
    """Write the model directory atomically: build it in a temp dir beside ``out``, then swap it in.

    ``extra(tmp_dir)``, when given, writes further files into the directory before the swap."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(text)
        if extra is not None:
            extra(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the shipped directory should be world-readable
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out.exists():  # os.replace cannot replace a non-empty directory: move the old one aside first
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced atomically)")
    defaults = TrainSettings()
    for field, value in asdict(defaults).items():
        if isinstance(value, tuple):
            continue
        p.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    s = TrainSettings(**{k: v for k, v in vars(args).items() if k != "out"})
    log.info("settings: %s", s)
    model, tokenizer, result = train(s)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("done: %s", result)
    save(model, tokenizer, readme(s, result, n_params), args.out)
    log.info("saved to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
