"""The induction task: repeated random tokens, first half redrawn, logit difference of the copied token."""

from __future__ import annotations

import pytest
import torch

from spartan_cli.errors import TaskError
from spartan_cli.tasks import get_task
from spartan_cli.tasks.induction import InductionTask, token_pool


def test_prompts_repeat_the_first_half_and_the_corruption_redraws_it(tiny_tokenizer):
    task = get_task("induction:8")
    batch = task.contrast(tiny_tokenizer, n=20, seed=3)
    L = 8
    assert batch.clean.shape == batch.corrupted.shape == (20, 2 * L - 1)
    assert bool(batch.attention_mask.all())  # one layout, no padding
    clean, corrupted = batch.clean, batch.corrupted
    assert torch.equal(clean[:, L:], clean[:, :L - 1])  # the second half copies the first
    assert torch.equal(corrupted[:, L:], clean[:, L:])  # the corruption keeps the second half ...
    for a, b in zip(clean.tolist(), corrupted.tolist()):
        assert not set(a[:L]) & set(b[:L])  # ... and redraws the first from other tokens
        assert len(set(a[:L])) == L
    assert batch.answers[:, 0].tolist() == clean[:, L - 1].tolist()  # right: the token to copy
    assert batch.answers[:, 1].tolist() == corrupted[:, L - 1].tolist()  # wrong: the corrupted copy target
    special = set(tiny_tokenizer.all_special_ids)
    assert not special & set(clean.flatten().tolist()) | set(corrupted.flatten().tolist()) & special
    again = task.contrast(tiny_tokenizer, n=20, seed=3)
    assert torch.equal(again.clean, clean) and torch.equal(again.corrupted, corrupted)
    assert not torch.equal(task.contrast(tiny_tokenizer, n=20, seed=4).clean, clean)


def test_spec_argument_and_bad_arguments(tiny_tokenizer):
    assert get_task("induction").spec == "induction" and get_task("induction").half == 16
    assert get_task("induction:5").spec == "induction:5"
    for bad in ("induction:x", "induction:1"):
        with pytest.raises(TaskError, match="induction"):
            get_task(bad)
    with pytest.raises(TaskError, match="ordinary tokens"):
        InductionTask(len(token_pool(tiny_tokenizer))).contrast(tiny_tokenizer, n=1)


def test_metric_reads_the_copied_token_against_the_corrupted_one():
    task = InductionTask(4)
    last = torch.zeros(2, 10)
    last[0, 3], last[0, 7] = 5.0, 1.0
    last[1, 2], last[1, 6] = -1.0, 2.0
    answers = torch.tensor([[3, 7], [2, 6]])
    assert task.row_scores(last, answers).tolist() == [4.0, -3.0]
    assert task.row_values(last, answers)["top1"].tolist() == [1.0, 0.0]
