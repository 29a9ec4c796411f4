"""greater-than: the year-token rule with the real GPT-2 tokenizer, a clear refusal from SmolLM2's, the metric."""

from collections import Counter

import pytest
import torch

from spartan_cli.errors import TaskError
from spartan_cli.tasks import encode, final_logits, get_task, single_token
from spartan_cli.tasks.greater_than import TEMPLATE


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.mark.real
def test_gpt2_years_follow_the_single_token_rule(gpt2_tok):
    task = get_task("greater-than")
    vocab = task.vocabulary(gpt2_tok)
    year_ids = vocab["year_ids"]
    assert [gpt2_tok.decode([i]) for i in year_ids] == [f"{y:02d}" for y in range(100)]
    assert len(set(year_ids)) == 100
    for year in vocab["years"]:
        xx, yy = divmod(year, 100)
        assert encode(gpt2_tok, f" {year}") == [single_token(gpt2_tok, f" {xx}"), year_ids[yy]]
    for century in range(11, 18):  # the first and last valid year of each century are dropped
        valid = sorted(y for y in range(century * 100, century * 100 + 100) if y not in vocab["bad_years"])
        kept = [y for y in vocab["years"] if y // 100 == century]
        assert kept == valid[1:-1]
    assert len(vocab["nouns"]) > 100  # most of the 120 nouns are one GPT-2 token
    assert encode(gpt2_tok, "The contract lasted from the year 1352 to the year 13") == \
        encode(gpt2_tok, TEMPLATE.format(noun="contract", xx=13, yy=52))  # EAP-IG's first row


@pytest.mark.real
def test_gpt2_prompts_are_minimal_pairs(gpt2_tok):
    task = get_task("greater-than")
    year_ids = task.vocabulary(gpt2_tok)["year_ids"]
    batch = task.contrast(gpt2_tok, n=194)
    assert batch.clean.shape == batch.corrupted.shape == (194, 12)  # single-token nouns: one length, no padding
    assert batch.attention_mask.all() and batch.answers.shape == (194, 101)
    assert (batch.answers[:, 1:] == torch.tensor(year_ids)).all()
    yy = batch.answers[:, 0]
    assert Counter(yy.tolist()) == Counter(list(range(2, 99)) * 2)  # balanced over 02..98
    for i in range(len(batch)):
        clean, corrupted = batch.clean[i].tolist(), batch.corrupted[i].tolist()
        changed = [p for p in range(12) if clean[p] != corrupted[p]]
        assert changed == [7]  # the YY token, right after " XX"
        assert clean[7] == year_ids[int(yy[i])] and corrupted[7] == year_ids[1]
        assert clean[-1] == clean[6] and gpt2_tok.decode(clean[-1:]).strip().isdigit()  # ends with " XX"
        text = gpt2_tok.decode(clean)
        assert text.startswith("The ") and f" from the year {gpt2_tok.decode(clean[6:8]).strip()} to the year" in text
    again = task.contrast(gpt2_tok, n=194)
    assert torch.equal(again.clean, batch.clean) and not torch.equal(task.contrast(gpt2_tok, n=194, seed=1).clean,
                                                                     batch.clean)


@pytest.mark.real
def test_smollm2_tokenizer_gets_a_clear_error(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(TaskError) as err:
        get_task("greater-than").contrast(tok)
    message = str(err.value)
    assert "'00' -> ['0', '0']" in message and "' 1352' -> [' ', '1', '3', '5', '2']" in message
    assert "none of the 700 years 1100-1799" in message and "GPT-2" in message and "SmolLM2" in message


def test_tiny_tokenizer_gets_the_error_too(tiny_tokenizer):
    with pytest.raises(TaskError, match="cannot be expressed with this tokenizer"):
        get_task("greater-than").contrast(tiny_tokenizer)


def test_metric_is_the_probability_difference():
    from spartan_cli.circuit.contrast import ContrastBatch

    vocab, rows = 130, 4
    g = torch.Generator().manual_seed(0)
    year_ids = torch.randperm(vocab, generator=g)[:100]  # "00".."99" scattered over the vocabulary
    yy = torch.tensor([2, 50, 98, 17])
    answers = torch.cat([yy[:, None], year_ids.expand(rows, 100)], 1)  # (4, 101)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    clean = torch.zeros(rows, 3, dtype=torch.long)
    batch = ContrastBatch(clean, clean, answers, mask)
    logits = 3 * torch.randn(rows, 3, vocab, generator=g)
    task = get_task("greater-than")
    want, top = [], []
    for i, last in enumerate([2, 1, 2, 0]):
        p = logits[i, last].softmax(-1)
        above = sum(float(p[year_ids[y]]) for y in range(100) if y > int(yy[i]))
        below = sum(float(p[year_ids[y]]) for y in range(100) if y <= int(yy[i]))
        want.append(above - below)
        top.append(float(int(p[year_ids].argmax()) > int(yy[i])))
    assert task.metric_name == "prob_diff"
    assert float(task.metric(logits, batch)) == pytest.approx(sum(want) / rows, abs=1e-6)
    values = task.row_values(final_logits(logits, batch), batch.answers)
    assert values["accuracy"].tolist() == top
    assert values["year_prob"].tolist() == pytest.approx(
        [float(logits[i, last].softmax(-1)[year_ids].sum()) for i, last in enumerate([2, 1, 2, 0])], abs=1e-6)
