"""The ``induction`` task: copy a repeated random token sequence (what induction heads do).

1. Clean prompt: a sequence A of L random tokens, then A again without its last token:
   ``A_1 .. A_L A_1 .. A_{L-1}``, 2L - 1 tokens. A model that copies predicts A_L next: after the
   repeated A_{L-1} it looks back at what followed A_{L-1} the first time.
2. Corrupted prompt: the first half redrawn, ``B_1 .. B_L A_1 .. A_{L-1}``, with B drawn from tokens
   not in A, so nothing earlier in the prompt says what follows A_{L-1}.
3. Metric: logit difference at the last position, logit[A_L] - logit[B_L] (``answers`` = [A_L, B_L]):
   the clean run copies A_L; in the corrupted run the copy target would be B_L. Also reported:
   ``top1``, the share of prompts whose argmax over the whole vocabulary is A_L.
Tokens are drawn uniformly from the tokenizer's ids, special tokens excluded; no BOS. ``induction:L``
sets the half length (default 16, so prompts are 31 tokens); every prompt has the same layout, so
token-level circuits apply.
"""

from __future__ import annotations

import random

from spartan_cli.errors import TaskError
from spartan_cli.tasks import LOGIT_DIFF, RowMetric, Task, contrast_batch, logit_difference, pad_id

DEFAULT_HALF = 16
TOP1 = RowMetric("top1", "the argmax over the whole vocabulary is the copied token", "fraction")


class InductionTask(Task):
    name = "induction"
    summary = "copy a repeated random token sequence: logit difference of the copied token, top-1 (induction:L)"
    native_model = "shakespeare"
    metric_name = "logit_diff"
    metric_description = "logit[copied token A_L] - logit[the corrupted prompt's B_L], last position"
    default_n = 64
    row_metrics = (LOGIT_DIFF, TOP1)
    fixed_layout = True  # every prompt: L tokens, then the first L - 1 again

    def __init__(self, half: int = DEFAULT_HALF):
        if not 2 <= half:
            raise TaskError(f"induction: half length {half!r} is too short; pass induction:L with L >= 2")
        self.half = half

    @property
    def spec(self) -> str:
        return self.name if self.half == DEFAULT_HALF else f"{self.name}:{self.half}"

    def configured(self, argument: str) -> "InductionTask":
        try:
            return InductionTask(int(argument))
        except ValueError:
            raise TaskError(f"induction: {argument!r} is not a half length; pass e.g. --task induction:16") from None

    def describe(self) -> dict:
        return {**super().describe(), "half": self.half, "corruption": "first-half",
                "corruption_description": "the first L tokens redrawn from tokens not in the sequence",
                "prompts": f"L={self.half} random tokens A, then A without its last token ({2 * self.half - 1} tokens)",
                "answers": "[A_L, B_L] per prompt"}

    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        n = self.default_n if n is None else n
        if n < 1:
            raise TaskError(f"induction: n={n!r}; ask for at least one prompt")
        pool = token_pool(tokenizer)
        if len(pool) < 2 * self.half:
            raise TaskError(f"induction: the tokenizer has {len(pool)} ordinary tokens, fewer than the "
                            f"{2 * self.half} a prompt needs; pass a shorter induction:L")
        rng = random.Random(seed)
        clean, corrupted, answers = [], [], []
        for _ in range(n):
            drawn = rng.sample(pool, 2 * self.half)  # distinct: A and B share no token
            a, b = drawn[:self.half], drawn[self.half:]
            clean.append(a + a[:-1])
            corrupted.append(b + a[:-1])
            answers.append([a[-1], b[-1]])
        return contrast_batch(clean, corrupted, answers, pad=pad_id(tokenizer))

    def row_scores(self, last, answers):
        return logit_difference(last, answers)  # (batch,)

    def row_values(self, last, answers) -> dict:
        return {"logit_diff": self.row_scores(last, answers),
                "top1": (last.argmax(-1) == answers[:, 0].to(last.device)).to(last.dtype)}


def token_pool(tokenizer) -> list[int]:
    """The ids random prompts draw from: every id of the tokenizer but its special tokens, sorted."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(tokenizer)) if i not in special]
