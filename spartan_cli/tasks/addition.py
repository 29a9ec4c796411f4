"""The ``addition`` task: the built-in model's two-digit addition (METHOD.md, the toy case study).

1. Data: all 10,000 problems ``aa+bb=ccccc`` (a, b in 0..99) as token ids of the built-in
   character tokenizer (``builtin.addition.encode``); the subset ``heldout_pairs`` holds the 1,000
   problems of ``split_pairs()`` that the dense model never trained on.
2. Metric: exact-match accuracy, all five answer digits right under teacher forcing, which equals
   greedy decoding (proof in ``builtin.addition.exact_match``), on all problems and on the held-out ones.
Only a tokenizer that maps "0".."9", "+", "=" to ids 0..11 (the built-in one) can express the task.
"""

from __future__ import annotations

from spartan_cli.errors import TaskError
from spartan_cli.tasks import Task, TaskData, TaskMetric, TaskResult


SUBSETS = {"heldout_pairs": "exact match on the held-out problems, never seen by the dense model"}


class AdditionTask(Task):
    name = "addition"
    summary = "two-digit addition of the built-in model: exact-match accuracy (all 10,000 and held-out problems)"
    native_model = "addition"

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
