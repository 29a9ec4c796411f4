"""The ``addition`` task: the built-in model's two-digit addition (docs/method.md, "The case studies").

1. Data: all 10,000 problems ``aa+bb=ccccc`` (a, b in 0..99) as token ids of the built-in
   character tokenizer (``builtin.addition.encode``); the subset ``heldout_pairs`` holds the 1,000
   problems of ``split_pairs()`` that the dense model never trained on.
2. Metric (``evaluate``): exact-match accuracy, all five answer digits right under teacher forcing,
   which equals greedy decoding (proof in ``builtin.addition.exact_match``), on all problems and on the
   held-out ones.
3. Contrast pairs (``contrast``, for circuits): a random problem ``aa+bb`` and its twin with some
   operand digits replaced, each by a different random digit: the corruption (``addition:NAME``) says
   which. The default ``b_units`` replaces b's units digit; that always changes the sum (by -9..9, never
   0 mod 10). Corruptions that replace several digits draw again until the sums differ. Both prompts
   run up to the first answer digit where the two sums differ, teacher-forcing the answer digits they
   share before it: ``53+21=0007`` / ``53+24=0007`` (sums 00074 / 00077 first differ in the units
   digit). The prompts then differ only in the replaced operand digits and have one length; across
   pairs the length is 8..10 tokens (hundreds, tens or units digit first differs), right-padded.
   Metric: logit difference at the last real position, logit[right digit] - logit[the corrupted
   problem's digit] (``answers`` = [right, wrong] per row), batch mean.
Only a tokenizer that maps "0".."9", "+", "=" to ids 0..11 (the built-in one) can express the task.
"""

from __future__ import annotations

import random

from spartan_cli.errors import TaskError
from spartan_cli.tasks import (LOGIT_DIFF, CorruptionChoice, Task, TaskData, TaskMetric, TaskResult, contrast_batch,
                               logit_difference, pad_id)


SUBSETS = {"heldout_pairs": "exact match on the held-out problems, never seen by the dense model"}

# Operand digit positions in ``aa+bb=ccccc``.
DIGITS = {"a_tens": 0, "a_units": 1, "b_tens": 3, "b_units": 4}
# Corruption name -> the operand digits it replaces, and what it does.
CORRUPTED_DIGITS = {**{name: (name,) for name in DIGITS}, "units": ("a_units", "b_units"),
                    "tens": ("a_tens", "b_tens"), "operands": tuple(DIGITS)}
CORRUPTIONS = {
    **{name: f"the {name.split('_')[1]} digit of {name[0]} replaced by a different random digit" for name in DIGITS},
    "units": "both units digits replaced, each by a different random digit",
    "tens": "both tens digits replaced, each by a different random digit",
    "operands": "all four operand digits replaced, each by a different random digit",
}
DEFAULT_CORRUPTION = "b_units"


class AdditionTask(CorruptionChoice, Task):
    name = "addition"
    summary = "two-digit addition of the built-in model: exact-match accuracy (all 10,000 and held-out problems)"
    native_model = "addition"
    metric_name = "logit_diff"
    metric_description = ("logit[right digit] - logit[corrupted problem's digit] at the first answer digit where "
                          "the two sums differ")
    default_n = 256
    row_metrics = (LOGIT_DIFF,)  # circuits only; ``score`` keeps exact match
    fixed_layout = True  # aa+bb=ccccc: every prompt is a prefix of one layout
    corruptions = CORRUPTIONS
    default_corruption = DEFAULT_CORRUPTION

    def describe(self) -> dict:
        return {**super().describe(),
                "prompts": "aa+bb= plus the answer digits both sums share, up to the first that differs",
                "answers": "[right digit id, corrupted problem's digit id] per prompt"}

    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        from spartan_cli.builtin import addition

        _check_tokenizer(tokenizer)
        n = self.default_n if n is None else n
        if not 1 <= n <= len(addition.ALL_PAIRS):
            raise TaskError(f"addition: n={n!r}; there are {len(addition.ALL_PAIRS)} problems, ask for 1..that many")
        rng = random.Random(seed)
        pairs = [addition.ALL_PAIRS[i] for i in rng.sample(range(len(addition.ALL_PAIRS)), n)]
        twins = [_twin(a, b, CORRUPTED_DIGITS[self.corruption], rng) for a, b in pairs]
        clean_ids, corrupted_ids = addition.encode(pairs).tolist(), addition.encode(twins).tolist()  # (n, 11)
        clean_rows, corrupted_rows, answers = [], [], []
        for clean, corrupted in zip(clean_ids, corrupted_ids):
            first = next(p for p in range(addition.ANSWER_START, addition.SEQ_LEN) if clean[p] != corrupted[p])
            clean_rows.append(clean[:first])  # the prompt predicts the token at ``first``
            corrupted_rows.append(corrupted[:first])
            answers.append([clean[first], corrupted[first]])
        return contrast_batch(clean_rows, corrupted_rows, answers, pad=pad_id(tokenizer))

    def row_scores(self, last, answers):
        return logit_difference(last, answers)  # (batch,)

    def build(self, tokenizer, *, seed: int = 0) -> TaskData:
        import torch

        from spartan_cli.builtin import addition

        _check_tokenizer(tokenizer)
        _, heldout = addition.split_pairs()
        heldout_rows = torch.tensor([addition.N_OPERAND * a + b for a, b in heldout], dtype=torch.long)  # (1000,)
        return TaskData(task=self.name, clean=addition.encode(addition.ALL_PAIRS),  # (10000, 11)
                        subsets={"heldout_pairs": heldout_rows})

    def score(self, model, data: TaskData, *, batch_size: int = 1000) -> TaskResult:
        from spartan_cli.builtin import addition

        ids = data.clean  # (n, 11)
        pairs = _pairs(ids)  # (n, 2)
        metrics = [TaskMetric("accuracy", addition.exact_match(model, pairs, batch_size=batch_size), len(pairs),
                              "exact match of all five answer digits, every problem", unit="fraction")]
        for subset, rows in data.subsets.items():
            metrics.append(TaskMetric(f"accuracy_{subset}", addition.exact_match(model, pairs[rows], batch_size=batch_size),
                                      len(rows), SUBSETS.get(subset, f"exact match on {subset}"), unit="fraction"))
        return TaskResult(task=self.name, metrics=tuple(metrics))


def _twin(a: int, b: int, digits: tuple[str, ...], rng: random.Random) -> tuple[int, int]:
    """(a, b) with each of ``digits`` replaced by a different random digit, drawn until the sum changes."""
    while True:
        row = [a // 10, a % 10, None, b // 10, b % 10]
        for name in digits:
            row[DIGITS[name]] = rng.choice([d for d in range(10) if d != row[DIGITS[name]]])
        twin = (row[0] * 10 + row[1], row[3] * 10 + row[4])
        if sum(twin) != a + b:
            return twin


def _pairs(ids):
    """Operands (a, b) of problem rows (n, 11) -> LongTensor (n, 2)."""
    import torch

    a = ids[:, 0] * 10 + ids[:, 1]  # (n,)
    b = ids[:, 3] * 10 + ids[:, 4]  # (n,)
    return torch.stack([a, b], dim=1)


def _check_tokenizer(tokenizer) -> None:
    from spartan_cli.builtin import addition

    symbols = list(addition.VOCAB)
    try:
        ids = tokenizer.convert_tokens_to_ids(symbols)
    except (AttributeError, KeyError, TypeError):
        ids = None
    if ids != list(range(len(symbols))):
        got = "" if ids is None else f" (it maps {''.join(symbols)} to {ids})"
        raise TaskError(f"task 'addition' needs the built-in addition tokenizer, digits 0-9 -> ids 0-9, '+' -> 10, "
                        f"'=' -> 11{got}; evaluate the built-in `addition` model or a checkpoint made from it")
