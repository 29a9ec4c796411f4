"""ioi: prompts pass the single-token rules with real tokenizers; corruption conventions; the metric."""

import pytest
import torch

from spartan_cli.errors import TaskError
from spartan_cli.tasks import TaskData, encode, final_logits, get_task, single_token
from spartan_cli.tasks.ioi import CORRUPTIONS, NAMES, OBJECTS, PLACES, IOITask, templates

# The documented check: the exact GPT-2 tokenizer on the IOI prompt
CHECK_PROMPT = "When Mary and John went to the store, John gave a drink to"
CHECK_IDS = [2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284]
CHANGED = {"s2": 1, "aba": 1, "abc": 3}  # positions where clean and corrupted differ


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def check_prompts(tok, task: IOITask, batch):
    """Every pair: one length, differs only at the name positions of the convention, answers [IO, S]
    single tokens, IO once and S twice in the clean prompt, nothing but pads after the mask."""
    rows, pos = batch.clean.shape
    assert batch.corrupted.shape == (rows, pos) and batch.answers.shape == (rows, 2)
    assert batch.answers.dtype == torch.long and batch.clean.dtype == torch.long
    names = {single_token(tok, " " + n) for n in NAMES} - {None}
    for i in range(rows):
        length = int(batch.attention_mask[i].sum())
        assert batch.attention_mask[i, :length].all() and not batch.attention_mask[i, length:].any()  # right-padded
        clean, corrupted = batch.clean[i, :length].tolist(), batch.corrupted[i, :length].tolist()
        assert encode(tok, tok.decode(clean)) == clean  # the ids are the tokenizer's own for that text
        io, s = batch.answers[i].tolist()
        assert io != s and {io, s} <= names
        assert tok.decode([io]).startswith(" ") and single_token(tok, tok.decode([io])) == io
        assert clean.count(io) == 1 and clean.count(s) == 2
        changed = [p for p in range(length) if clean[p] != corrupted[p]]
        assert len(changed) == CHANGED[task.corruption]
        assert all(clean[p] in names and corrupted[p] in names for p in changed)
        s2 = max(p for p in range(length) if clean[p] == s)
        assert s2 in changed  # every convention changes S2
        if task.corruption == "aba":
            assert corrupted[s2] == io
        else:
            assert corrupted[s2] not in (io, s)
        if task.corruption == "abc":
            assert not {io, s} & set(corrupted) and len({corrupted[p] for p in changed}) == 3


@pytest.mark.real
def test_offline_check_prompt_tokenizes_as_documented(gpt2_tok):
    assert encode(gpt2_tok, CHECK_PROMPT) == CHECK_IDS
    assert single_token(gpt2_tok, " Mary") == 5335 and single_token(gpt2_tok, " John") == 1757


@pytest.mark.real
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_gpt2_prompts_pass_the_single_token_rules(gpt2_tok, corruption):
    task = get_task(f"ioi:{corruption}")
    words = task.words(gpt2_tok)
    assert (len(words["names"]), len(words["places"]), len(words["objects"])) == (99, 8, 8)  # all of them
    batch = task.contrast(gpt2_tok, n=300)
    assert len(batch) == 300
    check_prompts(gpt2_tok, task, batch)
    first = [next(t for t in row.tolist() if t in ans.tolist()) for row, ans in zip(batch.clean, batch.answers)]
    io_first = [f == int(ans[0]) for f, ans in zip(first, batch.answers)]  # BABA: S first; ABBA: IO first
    assert sum(io_first[1::2]) == 150 and sum(io_first[0::2]) == 0  # alternating, half each


@pytest.mark.real
def test_smollm2_tokenizer_builds_ioi(smollm2_tok):
    task = get_task("ioi")
    batch = task.contrast(smollm2_tok, n=64)
    check_prompts(smollm2_tok, task, batch)
    assert smollm2_tok.bos_token_id not in batch.clean[batch.attention_mask.bool()].tolist()  # no BOS


@pytest.mark.real
def test_same_seed_same_clean_prompts_under_every_convention(gpt2_tok):
    s2 = get_task("ioi").contrast(gpt2_tok, n=20, seed=3)
    again = get_task("ioi:s2").contrast(gpt2_tok, n=20, seed=3)
    abc = get_task("ioi:abc").contrast(gpt2_tok, n=20, seed=3)
    other = get_task("ioi").contrast(gpt2_tok, n=20, seed=4)
    assert torch.equal(s2.clean, again.clean) and torch.equal(s2.corrupted, again.corrupted)
    assert torch.equal(s2.clean, abc.clean) and not torch.equal(s2.corrupted, abc.corrupted)
    assert not torch.equal(s2.clean, other.clean)


def test_templates_mirror_each_other():
    baba, abba = templates("BABA"), templates("ABBA")
    assert len(baba) == len(abba) == 15
    for b, a in zip(baba, abba):
        assert b.index("{S1}") < b.index("{IO}") < b.index("{S2}") and a.index("{IO}") < a.index("{S1}")
        assert b.replace("{S1} and {IO}", "{IO} and {S1}") == a
    assert baba[0].format(S1="John", IO="Mary", S2="John", place="store", object="drink") == \
        "Then, John and Mary went to the store. John gave a drink to"


def test_unknown_corruption_and_unexpressible_names(tiny_tokenizer):
    with pytest.raises(TaskError, match="choose one of s2, abc, aba"):
        get_task("ioi:xyz")
    with pytest.raises(TaskError, match="Michael") as err:  # the tiny BPE splits every name
        get_task("ioi").contrast(tiny_tokenizer)
    assert "needs at least 3 names" in str(err.value)
    assert get_task("ioi").describe()["bos"] is False and get_task("ioi:abc").describe()["corruption"] == "abc"
    assert len(PLACES) == len(OBJECTS) == 8 and len(set(NAMES)) == 99


def _hand_batch():
    """Three right-padded rows of lengths 4, 2, 3 over a 10-token vocabulary."""
    from spartan_cli.circuit.contrast import ContrastBatch

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    clean = torch.arange(12).reshape(3, 4) % 10
    return ContrastBatch(clean, clean.flip(1), torch.tensor([[1, 2], [3, 4], [5, 0]]), mask)


def test_metric_is_the_logit_difference_at_the_last_real_position():
    batch = _hand_batch()
    logits = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0))
    last = [3, 1, 2]
    want = sum(logits[i, last[i], batch.answers[i, 0]] - logits[i, last[i], batch.answers[i, 1]] for i in range(3)) / 3
    task = get_task("ioi")
    assert task.metric_name == "logit_diff"
    assert task.metric(logits, batch) == pytest.approx(float(want), abs=1e-6)
    padded = logits.clone()
    padded[1, 2:] = 1e3  # what the model says at pad positions is never read
    assert task.metric(padded, batch) == pytest.approx(float(want), abs=1e-6)
    assert torch.equal(final_logits(logits[:, 1:], batch), logits[[0, 1, 2], last])  # logits_to_keep=3
    right = [float(logits[i, last[i], batch.answers[i, 0]] > logits[i, last[i], batch.answers[i, 1]]) for i in range(3)]
    values = task.row_values(final_logits(logits, batch), batch.answers)
    assert values["accuracy"].tolist() == right


class _Table(torch.nn.Module):
    """A 'model' whose logits at a position are a fixed random row per input token."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table(input_ids)})


def test_score_reports_logit_diff_and_accuracy():
    batch = _hand_batch()
    data = TaskData(task="ioi", clean=batch.clean, corrupted=batch.corrupted, answers=batch.answers,
                    attention_mask=batch.attention_mask)
    torch.manual_seed(0)
    model = _Table(10)
    with torch.no_grad():
        logits = model(batch.clean).logits
    task = get_task("ioi")
    result = task.score(model, data, batch_size=2)  # two batches: 2 rows + 1 row
    assert result.value("logit_diff") == pytest.approx(float(task.metric(logits, batch)), abs=1e-6)
    acc = task.row_values(final_logits(logits, batch), batch.answers)["accuracy"].mean()
    assert result.value("accuracy") == pytest.approx(float(acc)) and result.metric("accuracy").examples == 3


def test_a_tokenizer_that_cannot_encode_the_names_gives_a_task_error():
    """The built-in addition model's character vocabulary has no unknown token: its Rust tokenizer raises a
    bare Exception on an IOI name, which must surface as one TaskError naming the text and the tokenizer."""
    from spartan_cli.builtin.addition import build_tokenizer

    with pytest.raises(TaskError, match=r"tokenizer \(.*13 tokens\) cannot encode the task's text ' \w+'.*Missing"):
        get_task("ioi").contrast(build_tokenizer(), n=4)
    assert len(encode(build_tokenizer(), "12+34=")) == 6  # text inside the vocabulary still encodes
