"""addition: contrast pairs corrupt operand digits (b's units by default) and stop at the first answer digit that differs."""

import pytest
import torch

from spartan_cli.builtin import addition
from spartan_cli.errors import TaskError
from spartan_cli.tasks import addition as addition_task
from spartan_cli.tasks import final_logits, get_task


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tok():
    return addition.build_tokenizer()


def test_pairs_differ_in_b_units_and_read_the_first_differing_digit(tok):
    batch = get_task("addition").contrast(tok, n=500)
    assert batch.clean.shape == batch.corrupted.shape and batch.answers.shape == (500, 2)
    lengths = batch.attention_mask.sum(1)
    assert set(lengths.tolist()) <= {8, 9, 10}  # answer digits 0-1 are always "00": hundreds, tens or units
    assert len(set(lengths.tolist())) == 3  # all three occur
    for i in range(500):
        n = int(lengths[i])
        clean, corrupted = batch.clean[i, :n].tolist(), batch.corrupted[i, :n].tolist()
        assert (batch.clean[i, n:] == addition.PAD_ID).all()
        assert [p for p in range(n) if clean[p] != corrupted[p]] == [4]  # b's units digit only
        a, b, b2 = clean[0] * 10 + clean[1], clean[3] * 10 + clean[4], corrupted[3] * 10 + corrupted[4]
        full, twin = addition.encode([(a, b)])[0].tolist(), addition.encode([(a, b2)])[0].tolist()
        assert clean == full[:n] and corrupted == twin[:n]  # teacher-forced prefix of each problem
        assert full[addition.ANSWER_START:n] == twin[addition.ANSWER_START:n]
        assert batch.answers[i].tolist() == [full[n], twin[n]] and full[n] != twin[n]
    again = get_task("addition").contrast(tok, n=500)
    assert torch.equal(again.clean, batch.clean) and torch.equal(again.answers, batch.answers)


@pytest.mark.parametrize("corruption", ["a_tens", "units", "tens", "operands"])
def test_other_corruptions_replace_their_digits_and_change_the_sum(tok, corruption):
    task = get_task(f"addition:{corruption}")
    assert task.spec == f"addition:{corruption}" and task.describe()["corruption"] == corruption
    replaced = {addition_task.DIGITS[d] for d in addition_task.CORRUPTED_DIGITS[corruption]}
    batch = task.contrast(tok, n=300, seed=1)
    lengths = batch.attention_mask.sum(1)
    for i in range(300):
        n = int(lengths[i])
        clean, corrupted = batch.clean[i, :n].tolist(), batch.corrupted[i, :n].tolist()
        assert {p for p in range(n) if clean[p] != corrupted[p]} == replaced  # each replaced digit differs
        a, b = clean[0] * 10 + clean[1], clean[3] * 10 + clean[4]
        a2, b2 = corrupted[0] * 10 + corrupted[1], corrupted[3] * 10 + corrupted[4]
        assert a + b != a2 + b2
        full, twin = addition.encode([(a, b)])[0].tolist(), addition.encode([(a2, b2)])[0].tolist()
        assert full[addition.ANSWER_START:n] == twin[addition.ANSWER_START:n] and full[n] != twin[n]
        assert batch.answers[i].tolist() == [full[n], twin[n]]
    with pytest.raises(TaskError, match="addition corruption 'hundreds' is unknown; choose one of a_tens"):
        get_task("addition:hundreds")


def test_metric_is_the_logit_difference(tok):
    task = get_task("addition")
    batch = task.contrast(tok, n=6, seed=2)
    logits = torch.randn(6, batch.clean.shape[1], 13, generator=torch.Generator().manual_seed(0))
    last = batch.attention_mask.sum(1) - 1
    want = torch.stack([logits[i, last[i], batch.answers[i, 0]] - logits[i, last[i], batch.answers[i, 1]]
                        for i in range(6)]).mean()
    assert task.metric_name == "logit_diff" and task.default_n == 256
    assert float(task.metric(logits, batch)) == pytest.approx(float(want), abs=1e-6)
    assert final_logits(logits, batch).shape == (6, 13)


def test_shipped_dense_model_prefers_the_right_digit(tok):
    """Exact match of every answer digit implies the right digit out-scores the corrupted problem's."""
    model, _ = addition.load_model()
    task = get_task("addition")
    batch = task.contrast(tok, n=64)
    with torch.no_grad():
        logits = model(input_ids=batch.clean, attention_mask=batch.attention_mask).logits
    assert (task.row_scores(final_logits(logits, batch), batch.answers) > 0).all()


def test_contrast_refuses_other_tokenizers_and_bad_n(tok, tiny_tokenizer):
    with pytest.raises(TaskError, match="needs the built-in addition tokenizer"):
        get_task("addition").contrast(tiny_tokenizer)
    with pytest.raises(TaskError, match="ask for 1..that many"):
        get_task("addition").contrast(tok, n=0)
    assert get_task("addition").describe()["corruption"] == "b_units"
