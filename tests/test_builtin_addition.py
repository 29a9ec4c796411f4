"""The built-in addition model and its data (spartan_cli.builtin.addition)."""

from __future__ import annotations

import pytest
import torch

from spartan_cli.builtin import addition
from spartan_cli.errors import DataError


def test_format_problem_pads_operands_and_answer():
    assert addition.format_problem(53, 21) == "53+21=00074"
    assert addition.format_problem(7, 3) == "07+03=00010"
    assert addition.format_problem(99, 99) == "99+99=00198"
    with pytest.raises(DataError):
        addition.format_problem(100, 1)


def test_tokenizer_round_trip_matches_encode(tmp_path):
    from transformers import AutoTokenizer

    addition.build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "53+21=00074"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [5, 3, 10, 2, 1, 11, 0, 0, 0, 7, 4]
    assert tok.decode(ids) == text
    assert tok.pad_token_id == addition.PAD_ID == len(tok) - 1
    # encode() is the tokenizer, computed arithmetically
    pairs = [(53, 21), (0, 0), (99, 99), (40, 8)]
    want = [tok(addition.format_problem(a, b), add_special_tokens=False).input_ids for a, b in pairs]
    assert addition.encode(pairs).tolist() == want
    assert addition.decode(addition.encode(pairs)) == [addition.format_problem(a, b) for a, b in pairs]


def test_encode_and_blocks_score_exactly_the_answer_digits():
    pairs = [(53, 21), (99, 99), (0, 1)]
    ids = addition.encode(pairs)
    assert ids.shape == (3, 11) and ids.dtype == torch.long
    b = addition.blocks(pairs)
    assert b.input_ids.shape == b.labels.shape == (3, 11)
    scored = b.labels != -100
    assert scored.sum(1).tolist() == [5, 5, 5]
    assert scored[:, 6:].all() and not scored[:, :6].any()
    assert torch.equal(b.labels[:, 6:], ids[:, 6:])
    assert b.labels[1, 6:].tolist() == [0, 0, 1, 9, 8]


def test_split_is_deterministic_disjoint_and_complete():
    train, held = addition.split_pairs()
    assert (train, held) == addition.split_pairs(seed=0, heldout=1000)
    assert len(train) == 9000 and len(held) == 1000
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(addition.ALL_PAIRS)
    assert len(addition.ALL_PAIRS) == 10_000
    assert addition.split_pairs(seed=1)[1] != held


def test_splits_use_train_pairs_for_train_and_heldout_for_heldout():
    train, held = addition.split_pairs()
    s = addition.splits(seed=3, n_train=20_000)
    assert s.train.input_ids.shape == (20_000, 11) and s.heldout.input_ids.shape == (1000, 11)
    train_rows = {tuple(r) for r in s.train.input_ids[:, [0, 1, 3, 4]].tolist()}
    assert train_rows == {(a // 10, a % 10, b // 10, b % 10) for a, b in train}
    assert torch.equal(s.heldout.input_ids, addition.encode(held))
    assert torch.equal(addition.splits().train.input_ids, addition.splits().train.input_ids)
    assert len(addition.splits().train) == 9000


@pytest.fixture(scope="module")
def shipped():
    return addition.load_model()


def test_shipped_model_solves_heldout_problems(shipped):
    model, tok = shipped
    assert model.config.n_layer == 4 and model.config.vocab_size == len(tok)
    _, held = addition.split_pairs()
    model.train()
    assert addition.exact_match(model, held) >= 0.995  # measured 1.0 (see addition/README.md)
    assert model.training  # the training flag is restored


def test_random_model_of_same_config_fails(shipped):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(shipped[0].config)
    _, held = addition.split_pairs()
    assert addition.exact_match(model, held) < 0.1
