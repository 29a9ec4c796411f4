"""The built-in ``addition`` model and its data: the paper's toy case study (Figure 1).

A 4-layer GPT-2 trained on two-digit addition. Every problem is 11 character tokens,
``a a + b b = c c c c c``: both operands zero-padded to two digits, the sum left-padded with zeros to
five digits ("53+21=00074"). There are 10,000 problems (a, b in 0..99); a fixed, seeded split holds
1,000 of them out, and the dense model never trained on those.

Vocabulary (ids in this order, no BOS/EOS): "0".."9" -> 0..9, "+" -> 10, "=" -> 11, and "<pad>" -> 12,
a dedicated pad token that never occurs in a problem (so padding can never be mistaken for a digit).
The tokenizer has no unknown token: text outside the vocabulary raises instead of being silently mapped.

Only the five answer digits are scored. Hugging Face shifts labels by one inside the model, so the
logits at positions 5..9 ("=" and the first four answer digits) predict the answer tokens at 6..10.

How the shipped weights were made: ``python -m spartan_cli.builtin.make_addition --out
spartan_cli/builtin/addition`` (see that module and ``addition/README.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.errors import DataError, ModelError

log = logging.getLogger(__name__)

SEQ_LEN = 11  # a a + b b = c c c c c
ANSWER_DIGITS = 5
ANSWER_START = 6  # first answer token position
N_OPERAND = 100  # operands are 0..99
VOCAB = tuple("0123456789+=")  # ids 0..11 in this order
PAD_TOKEN = "<pad>"  # id 12
PLUS_ID = 10
EQUALS_ID = 11
PAD_ID = 12

# All 10,000 problems, a-major: ALL_PAIRS[100 * a + b] == (a, b).
ALL_PAIRS: tuple[tuple[int, int], ...] = tuple((a, b) for a in range(N_OPERAND) for b in range(N_OPERAND))


# ----------------------------------------------------------------------------------------- problems
def format_problem(a: int, b: int) -> str:
    """The 11-character text of one problem with its answer, e.g. ``format_problem(53, 21) == "53+21=00074"``."""
    _check_operand(a)
    _check_operand(b)
    return f"{a:02d}+{b:02d}={a + b:05d}"


def split_pairs(seed: int = 0, heldout: int = 1000) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """A fixed split of ``ALL_PAIRS`` into (train pairs, held-out pairs), both sorted.

    The split is a seeded permutation (``torch.Generator``), so it is the same on every machine and
    torch version that keeps ``randperm``'s CPU stream. The dense model was trained on the train pairs of
    ``split_pairs()`` (seed 0, 1,000 held out) only.
    """
    if not 0 < heldout < len(ALL_PAIRS):
        raise DataError(f"heldout={heldout!r}: expected an integer in 1..{len(ALL_PAIRS) - 1}; pass e.g. heldout=1000")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ALL_PAIRS), generator=gen)  # (10000,)
    held = sorted(perm[:heldout].tolist())
    train = sorted(perm[heldout:].tolist())
    return [ALL_PAIRS[i] for i in train], [ALL_PAIRS[i] for i in held]


def encode(pairs) -> torch.Tensor:
    """Token ids of the problems with their answers: LongTensor (n, 11).

    ``pairs``: a sequence of (a, b) or an int tensor (n, 2). Built arithmetically (digit i of the text is
    its own token id), which is identical to running the tokenizer on ``format_problem`` and much faster.
    """
    ab = _as_pair_tensor(pairs)  # (n, 2)
    a, b = ab[:, 0], ab[:, 1]  # (n,), (n,)
    total = a + b  # (n,)
    n = ab.shape[0]
    ids = torch.empty(n, SEQ_LEN, dtype=torch.long)  # (batch, pos)
    ids[:, 0], ids[:, 1] = a // 10, a % 10
    ids[:, 2] = PLUS_ID
    ids[:, 3], ids[:, 4] = b // 10, b % 10
    ids[:, 5] = EQUALS_ID
    for k in range(ANSWER_DIGITS):  # most significant first
        ids[:, ANSWER_START + k] = (total // 10 ** (ANSWER_DIGITS - 1 - k)) % 10
    return ids


def decode(input_ids: torch.Tensor) -> list[str]:
    """Texts of token-id rows (n, pos) or one row (pos,); the inverse of ``encode`` on well-formed ids."""
    names = VOCAB + (PAD_TOKEN,)
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= len(names)):
        raise DataError(f"decode: token ids must lie in 0..{len(names) - 1}; pass ids from encode()")
    rows = input_ids.reshape(-1, input_ids.shape[-1]).tolist()
    return ["".join(names[i] for i in row) for row in rows]


def blocks(pairs) -> TokenBlocks:
    """TokenBlocks (n, 11) whose labels score exactly the five answer digits (-100 elsewhere)."""
    ids = encode(pairs)  # (batch, pos)
    labels = torch.full_like(ids, -100)  # (batch, pos)
    labels[:, ANSWER_START:] = ids[:, ANSWER_START:]
    return TokenBlocks(ids, labels)


def splits(seed: int = 0, *, n_train: int | None = None, heldout: int = 1000) -> Splits:
    """Train and held-out blocks for post-training the built-in model.

    train: the train pairs of ``split_pairs(0, heldout)`` (the dense model's own training problems), in
    an order shuffled by ``seed``; with ``n_train`` set, that many rows, cycling through fresh shuffles
    when ``n_train`` exceeds the number of train pairs. heldout: the held-out pairs, in order.
    The split itself is always seed 0 so the held-out problems stay unseen by the dense model;
    ``seed`` only orders the training rows. (The held-out pairs are a prefix of one seeded permutation,
    so any ``heldout <= 1000`` is a subset of the dense model's unseen 1,000.)
    """
    train_pairs, held_pairs = split_pairs(0, heldout)
    if n_train is not None and n_train < 1:
        raise DataError(
            f"n_train={n_train!r}: expected a positive integer, or None for all {len(train_pairs)} train pairs"
        )
    want = len(train_pairs) if n_train is None else n_train
    gen = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < want:
        order.extend(torch.randperm(len(train_pairs), generator=gen).tolist())
    train = torch.tensor(train_pairs, dtype=torch.long)[order[:want]]  # (n_train, 2)
    return Splits(train=blocks(train), heldout=blocks(held_pairs))


def heldout_blocks() -> TokenBlocks:
    """The 1,000 held-out problems (answer digits scored): what ``evaluate`` measures CE on."""
    return splits().heldout


def task_metrics(model) -> dict:
    """Exact match on all 10,000 problems and on the held-out ones (what ``sparsify`` reports)."""
    _, heldout_pairs = split_pairs()
    return {"accuracy": exact_match(model), "accuracy_heldout_pairs": exact_match(model, heldout_pairs),
            "accuracy_problems": len(ALL_PAIRS)}


# ----------------------------------------------------------------------------------------- metric
def exact_match(model, pairs=None, *, batch_size: int = 1000) -> float:
    """Fraction of problems whose five answer digits are all predicted correctly (argmax).

    One teacher-forced forward per batch suffices: if every answer digit's argmax is right, greedy
    decoding would have fed back exactly the true digits, so its prefixes, and hence its predictions,
    are the teacher-forced ones (induction over the five steps). If any digit is wrong, greedy decoding
    is wrong too (its first mistake happens at the first wrong teacher-forced step, with identical
    prefix). So "all five argmaxes right" is exactly "greedy decoding right".

    ``pairs`` defaults to all 10,000 problems. Runs on the model's device under ``torch.no_grad`` in
    eval mode, restoring the model's training flag afterwards.
    """
    ids = encode(ALL_PAIRS if pairs is None else pairs)  # (n, pos)
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size!r}: expected a positive integer")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size].to(device)  # (batch, pos)
                logits = model(input_ids=batch).logits  # (batch, pos, vocab)
                pred = logits[:, ANSWER_START - 1 : SEQ_LEN - 1].argmax(-1)  # (batch, 5)
                correct += int((pred == batch[:, ANSWER_START:]).all(-1).sum())
    finally:
        model.train(was_training)
    return correct / ids.shape[0]


# ----------------------------------------------------------------------------------------- model
def build_tokenizer():
    """The character-level tokenizer as a ``transformers.PreTrainedTokenizerFast`` (see module docstring)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(VOCAB)}
    vocab[PAD_TOKEN] = PAD_ID
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()  # join tokens without spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, model_max_length=SEQ_LEN)


def build_config(*, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, n_positions: int = 16):
    """The ``GPT2Config`` of the built-in model (dropout off; no BOS/EOS; pad = ``<pad>``)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(VOCAB) + 1,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
    )


def model_dir() -> Path:
    """The shipped model directory (config.json, model.safetensors, tokenizer files, README.md)."""
    return Path(__file__).resolve().parent / "addition"


def load_model(*, dtype: torch.dtype = torch.float32):
    """Load the shipped dense model and its tokenizer: ``(GPT2LMHeadModel, tokenizer)``, model in eval mode on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise ModelError(
            f"built-in addition model at {path} lacks {', '.join(missing)}; "
            "rebuild it with `python -m spartan_cli.builtin.make_addition --out spartan_cli/builtin/addition`"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------- internals
def _check_operand(x) -> None:
    if not isinstance(x, int) or not 0 <= x < N_OPERAND:
        raise DataError(f"operand {x!r}: expected an integer in 0..{N_OPERAND - 1}")


def _as_pair_tensor(pairs) -> torch.Tensor:
    ab = pairs.to(torch.long) if isinstance(pairs, torch.Tensor) else torch.tensor(list(pairs), dtype=torch.long)
    ab = ab.reshape(-1, 2) if ab.numel() == 0 else ab  # (n, 2)
    if ab.dim() != 2 or ab.shape[1] != 2:
        raise DataError(f"pairs of shape {tuple(ab.shape)}: expected (n, 2) operand pairs (a, b)")
    if ab.numel() and (ab.min() < 0 or ab.max() >= N_OPERAND):
        raise DataError(f"pairs hold operands outside 0..{N_OPERAND - 1}; pass two-digit operands")
    return ab
