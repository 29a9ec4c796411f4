"""The built-in shakespeare language model, its data mixture, its preset and the induction task on it."""

from __future__ import annotations

import json

import pytest
import torch

from spartan_cli.builtin import shakespeare
from spartan_cli.errors import DataError


@pytest.fixture(scope="module")
def shipped():
    return shakespeare.load_model()


def _is_tiled(row: torch.Tensor) -> bool:
    """Whether a row is one segment of MIN..MAX_SEGMENT tokens repeated."""
    return any(torch.equal(row[n:], row[:-n]) for n in range(shakespeare.MIN_SEGMENT, shakespeare.MAX_SEGMENT + 1))


def test_mixture_is_seeded_and_holds_its_share_of_tiled_rows():
    stream = torch.arange(5000)  # distinct tokens: a text row is never tiled
    a = shakespeare.mixture(stream, 400, torch.Generator().manual_seed(1))
    b = shakespeare.mixture(stream, 400, torch.Generator().manual_seed(1))
    assert a.shape == (400, shakespeare.SEQ_LEN) and torch.equal(a, b)
    assert not torch.equal(a, shakespeare.mixture(stream, 400, torch.Generator().manual_seed(2)))
    tiled = [_is_tiled(row) for row in a]
    assert sum(tiled) == round(400 * shakespeare.REPEAT_FRACTION)
    text = a[[not t for t in tiled]]
    assert bool((text[:, 1:] - text[:, :-1] == 1).all())  # text rows are consecutive stream tokens
    held = shakespeare.mixture(stream, 8, torch.Generator().manual_seed(0), random_starts=False)
    starts = sorted(int(r[0]) for r in held if not _is_tiled(r))
    n_text = 8 - round(8 * shakespeare.REPEAT_FRACTION)
    assert starts == [i * shakespeare.SEQ_LEN for i in range(n_text)]  # consecutive, non-overlapping
    with pytest.raises(DataError, match="held-out text tokens"):
        shakespeare.mixture(torch.arange(300), 8, torch.Generator(), random_starts=False)


def test_validation_rows_share_no_text_with_the_heldout_rows_or_the_text_blocks():
    """What geco.reference "validation" reads is held out like the held-out rows but never measured as them."""
    splits = shakespeare.splits(n_train=64)
    reported = {tuple(r) for r in splits.heldout.input_ids.tolist()} | {
        tuple(r) for r in shakespeare.text_blocks().input_ids.tolist()}
    val = splits.validation.input_ids
    assert len(val) == 128 and val.shape[1] == shakespeare.SEQ_LEN
    assert not reported & {tuple(r) for r in val.tolist()}
    _, heldout_stream = shakespeare.streams()
    windows = heldout_stream[:shakespeare.TEXT_ROWS * shakespeare.SEQ_LEN].unfold(0, 16, 1)  # every 16-token window
    seen = {tuple(w) for w in windows.tolist()}
    text_rows = [r for r in val.tolist() if len(set(r)) > 64]  # the text rows (tiled rows repeat short segments)
    assert text_rows and not any(tuple(r[:16]) in seen for r in text_rows)


def test_shipped_model_is_a_plain_gpt2_with_its_tokenizer(shipped):
    model, tok = shipped
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.vocab_size == len(tok) == shakespeare.VOCAB_SIZE
    assert model.config.n_positions == shakespeare.SEQ_LEN
    assert tok.convert_tokens_to_ids(shakespeare.EOS_TOKEN) == shakespeare.EOS_ID == tok.eos_token_id
    text = "To be, or not to be, that is the question:"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # a real BPE, not characters
    train, heldout = shakespeare.streams()
    assert train.dtype == heldout.dtype == torch.long and len(train) > 10 * len(heldout) > 0
    assert 0 <= int(train.min()) and int(train.max()) < shakespeare.VOCAB_SIZE


def test_shipped_model_predicts_heldout_text_and_copies(shipped):
    from spartan_cli.measure.heldout import measure

    model, _ = shipped
    text = measure(model, shakespeare.text_blocks(64), batch_size=32).ce
    assert text < 5.0  # uniform guessing: ln 4096 = 8.32; README.md has the measured value
    metrics = shakespeare.task_metrics(model)
    assert metrics["ce_text"] < 5.0
    assert metrics["induction_top1"] > 0.9 and metrics["induction_logit_diff"] > 5.0
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    untrained = shakespeare.task_metrics(GPT2LMHeadModel(model.config))
    assert untrained["induction_top1"] < 0.1 and untrained["ce_text"] > 7.0


def test_induction_metric_sign_and_the_full_and_empty_circuits(shipped):
    from spartan_cli.circuit import Graph, evaluate
    from spartan_cli.tasks import get_task

    model, tok = shipped
    task = get_task("induction")
    batch = task.contrast(tok, n=16, seed=0)
    with torch.no_grad():
        clean = float(task.metric(model(batch.clean).logits, batch))
        corrupted = float(task.metric(model(batch.corrupted).logits, batch))
    assert clean > 5.0 and abs(corrupted) < 0.25 * clean  # copying needs the first half
    graph = Graph.from_model(model)
    empty = graph.with_circuit(torch.zeros_like(graph.real))
    result = evaluate(model, [batch], metric=task.metric, circuits=[graph, empty])
    assert result.metrics[0] == pytest.approx(clean, abs=1e-4)
    assert result.metrics[1] == pytest.approx(corrupted, abs=1e-4)


def test_gates_open_reproduce_the_dense_model(shipped):
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.config import GateConfig
    from spartan_cli.gating.scopes import gates_open

    dense, _ = shakespeare.load_model()
    ids = shakespeare.text_blocks(2).input_ids
    with torch.no_grad():
        want = dense(ids).logits
        attach_gates(dense, GateConfig(bias=1.0))
        with gates_open(dense):
            got = dense(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_preset_sparsify_runs_a_few_steps(tmp_path, capsys):
    from tests.test_cli_sparsify import run_cli

    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["sparsify", "shakespeare", "--out", str(out), "--steps", "3", "--eval-every", "0",
                                    "--batch-size", "4", "--quiet", "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["steps"] == 3 and summary["model"] == "shakespeare"
    assert summary["ce"] == pytest.approx(summary["base_ce"], abs=0.5)
    assert {"ce_text", "induction_logit_diff", "induction_top1"} <= set(summary)
    run = json.loads((out / "spartan.json").read_text())
    assert run["base_model"] == "builtin:shakespeare"
    from spartan_cli.training.presets import PRESETS

    assert run["gate"]["bias"] == PRESETS["shakespeare"]["gate"]["bias"]  # the preset was applied
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["det_ce"] is not None and r["ref_ce"] is not None for r in records)  # read on validation rows
    code, _, stderr = run_cli(["sparsify", "shakespeare", "--data", "x.txt", "--out", str(tmp_path / "r2")], capsys)
    assert code == 1 and "brings its own data" in stderr
