"""custom:FILE: spartan JSONL, EAP-IG CSV and auto-circuit JSON give the same pairs; rows that break the
single-token and equal-length rules are named; the multi-answer logit difference."""

import json

import pytest
import torch

from spartan_cli.errors import TaskError
from spartan_cli.tasks import encode, get_task
from spartan_cli.tasks.custom import Pair, read_pairs, write_pairs

# single-letter "names" are single tokens (" b", " c", ...) of the tiny byte-level BPE
PAIRS = [
    Pair("When b and c met, c gave it to", "When b and c met, d gave it to", (" b",), (" c",)),
    Pair("Then, f and g sang. g gave it to", "Then, f and g sang. h gave it to", (" f",), (" g",)),
    Pair("The lo said to the ca that the", "The lo said to the do that the", (" ca",), (" lo",)),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


def expected(tok, pairs):
    """clean/corrupted rows and [right, wrong] ids tokenised by hand."""
    return ([encode(tok, p.clean) for p in pairs], [encode(tok, p.corrupted) for p in pairs],
            [[encode(tok, p.correct[0])[0], encode(tok, p.incorrect[0])[0]] for p in pairs])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_each_format_round_trips(tiny_tokenizer, tmp_path, suffix):
    path = write_pairs(tmp_path / f"pairs{suffix}", PAIRS, tokenizer=tiny_tokenizer)
    read = read_pairs(path)
    if suffix == ".csv":  # EAP-IG stores answer token ids
        assert [(p.clean, p.corrupted) for p in read] == [(p.clean, p.corrupted) for p in PAIRS]
        assert all(isinstance(a, int) for p in read for a in (*p.correct, *p.incorrect))
    else:
        assert read == PAIRS
    batch = get_task(f"custom:{path}").contrast(tiny_tokenizer)
    clean, corrupted, answers = expected(tiny_tokenizer, PAIRS)
    for i in range(len(PAIRS)):
        length = int(batch.attention_mask[i].sum())
        assert length == len(clean[i]) and not batch.attention_mask[i, length:].any()
        assert batch.clean[i, :length].tolist() == clean[i] and batch.corrupted[i, :length].tolist() == corrupted[i]
    assert batch.answers.tolist() == answers


def test_eap_ig_csv_with_index_and_extra_columns(tiny_tokenizer, tmp_path):
    (_, _, answers) = expected(tiny_tokenizer, PAIRS[:2])
    path = tmp_path / "ioi.csv"  # the layout of EAP-IG's IOI csv: pandas index, corrupted_hard, quoted commas
    rows = [",clean,corrupted,corrupted_hard,correct_idx,incorrect_idx"]
    for i, (p, (right, wrong)) in enumerate(zip(PAIRS[:2], answers)):
        rows.append(f'{i + 7},"{p.clean}","{p.corrupted}","{p.clean}",{right},{wrong}')
    path.write_text("\n".join(rows) + "\n")
    batch = get_task(f"custom:{path}").contrast(tiny_tokenizer)
    assert batch.answers.tolist() == answers and len(batch) == 2


def test_auto_circuit_json_with_several_answers(tiny_tokenizer, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"word_idxs": {"end": 3}, "prompts": [
        {"clean": "When b and c met, c gave it to", "corrupt": "When b and c met, d gave it to",
         "answers": [" b", " f"], "wrong_answers": [" c"]},
        {"clean": "Then, f and g sang. g gave it to", "corrupt": "Then, f and g sang. h gave it to",
         "answers": [" f"], "wrong_answers": [" g", " h"]}]}))
    task = get_task(f"custom:{path}")
    batch = task.contrast(tiny_tokenizer)
    ids = {w: encode(tiny_tokenizer, w)[0] for w in (" b", " c", " f", " g", " h")}
    assert batch.answers.tolist() == [[ids[" b"], ids[" f"], ids[" c"], -1], [ids[" f"], -1, ids[" g"], ids[" h"]]]
    logits = torch.randn(2, batch.clean.shape[1], len(tiny_tokenizer), generator=torch.Generator().manual_seed(0))
    last = batch.attention_mask.sum(1) - 1
    z = [logits[i, last[i]] for i in range(2)]
    want = ((z[0][ids[" b"]] + z[0][ids[" f"]]) / 2 - z[0][ids[" c"]]
            + z[1][ids[" f"]] - (z[1][ids[" g"]] + z[1][ids[" h"]]) / 2) / 2
    assert task.metric_name == "logit_diff"
    assert float(task.metric(logits, batch)) == pytest.approx(float(want), abs=1e-5)


def test_subset_is_seeded_and_keeps_file_order(tiny_tokenizer, tmp_path):
    path = write_pairs(tmp_path / "many.jsonl", PAIRS * 4)
    task = get_task(f"custom:{path}")
    assert len(task.contrast(tiny_tokenizer)) == 12 and task.default_n is None
    a, b = task.contrast(tiny_tokenizer, n=5, seed=1), task.contrast(tiny_tokenizer, n=5, seed=1)
    assert torch.equal(a.clean, b.clean) and len(a) == 5
    with pytest.raises(TaskError, match="holds 12 pairs"):
        task.contrast(tiny_tokenizer, n=13)


def test_bad_rows_are_named(tiny_tokenizer, tmp_path):
    uneven = tmp_path / "uneven.jsonl"
    write_pairs(uneven, [PAIRS[0], Pair("When b and c met, c gave it to", "When b and c met, hills and d gave it to",
                                        (" b",), (" c",))])
    with pytest.raises(TaskError, match=r"1 of 2 pairs .* uneven.jsonl line 2 \(\d+ vs \d+ tokens\)"):
        get_task(f"custom:{uneven}").contrast(tiny_tokenizer)
    long_answer = tmp_path / "long.jsonl"
    write_pairs(long_answer, [Pair(PAIRS[0].clean, PAIRS[0].corrupted, (" Michael",), (" c",))])
    with pytest.raises(TaskError, match="long.jsonl line 1: ' Michael' -> "):
        get_task(f"custom:{long_answer}").contrast(tiny_tokenizer)
    missing_key = tmp_path / "keys.jsonl"
    missing_key.write_text(json.dumps({"clean": "a", "corrupted": "b", "correct": " a"}) + "\n")
    with pytest.raises(TaskError, match="keys.jsonl line 1 must be an object with keys clean, corrupted, correct, "
                                        "incorrect"):
        read_pairs(missing_key)
    greater = tmp_path / "greater_than_data.csv"
    greater.write_text("clean,corrupted,label\nThe deal lasted from the year 1352 to the year 13,"
                       "The deal lasted from the year 1301 to the year 13,52\n")
    with pytest.raises(TaskError, match="use --task greater-than"):
        read_pairs(greater)
    ids = tmp_path / "ids.csv"
    ids.write_text(f'clean,corrupted,correct_idx,incorrect_idx\n"{PAIRS[0].clean}","{PAIRS[0].corrupted}",5,99999\n')
    with pytest.raises(TaskError, match="id 99999 outside the vocabulary"):
        get_task(f"custom:{ids}").contrast(tiny_tokenizer)


def test_file_argument_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(TaskError, match="needs a file"):
        get_task("custom:")
    with pytest.raises(TaskError, match="needs a file"):
        get_task("custom").contrast(tiny_tokenizer)
    with pytest.raises(TaskError, match="does not exist"):
        get_task(f"custom:{tmp_path / 'nope.jsonl'}").contrast(tiny_tokenizer)
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(TaskError, match="suffix '.txt'; use one of .jsonl"):
        get_task(f"custom:{tmp_path / 'rows.txt'}").contrast(tiny_tokenizer)
    task = get_task(f"custom:{tmp_path / 'rows.jsonl'}")
    assert task.spec == f"custom:{tmp_path / 'rows.jsonl'}" and task.describe()["format"].startswith("spartan rows")
