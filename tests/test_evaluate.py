"""spartan evaluate: sparse and base numbers side by side, tasks, and one-line errors for bad input."""

import json

import pytest
import torch

from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import attach_gates
from spartan_cli.cli.main import main
from spartan_cli.config import GateConfig
from spartan_cli.errors import TaskError
from spartan_cli.measure.heldout import measure
from spartan_cli.tasks import TASKS, TaskData, default_task, get_task

SEQ_LEN = 32


def make_checkpoint(out, model_dir, text_file, *, bias: float):
    """A spartan checkpoint of the tiny GPT-2 in ``model_dir`` gated at ``bias`` (no training needed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    gate = GateConfig(bias=bias)
    attach_gates(model, gate)
    meta = {"gate": gate.to_dict(), "base_model": str(model_dir), "base_model_name": "tiny-gpt2",
            "data": {"source": str(text_file), "seq_len": SEQ_LEN, "heldout_blocks": 6}}
    return checkpoint.save(out, model, tok, meta=meta)


def run_json(argv, capsys) -> dict:
    main(argv + ["--json", "-q"])
    return json.loads(capsys.readouterr().out)


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture()
def ckpt(tmp_path, tiny_gpt2_dir, tiny_text_file):
    return make_checkpoint(tmp_path / "ckpt", tiny_gpt2_dir, tiny_text_file, bias=0.0)


def test_checkpoint_beside_its_base(ckpt, tiny_gpt2_dir, capsys):
    from spartan_cli.hf.subjects import load_subject
    from spartan_cli.measure.evaluate import eval_data

    report = run_json(["evaluate", str(ckpt)], capsys)
    subject = load_subject(str(ckpt))
    blocks = eval_data(subject).blocks  # the held-out blocks of the stored data config
    sparse = measure(subject.model, blocks)
    base = measure(load_subject(str(tiny_gpt2_dir)).model, blocks)
    assert report["model"]["gated"] and not report["base"]["gated"]
    assert report["model"]["ce"] == pytest.approx(sparse.ce, abs=1e-6)
    assert report["model"]["density"] == pytest.approx(sparse.density, abs=1e-12)
    assert report["base"]["ce"] == pytest.approx(base.ce, abs=1e-6) and report["base"]["density"] is None
    assert report["base"]["name"] == str(tiny_gpt2_dir)
    assert report["ce_gap"] == pytest.approx(sparse.ce - base.ce, abs=1e-6)
    assert report["model"]["perplexity"] == pytest.approx(torch.tensor(sparse.ce).exp().item(), rel=1e-6)
    assert report["data"]["split"] == "heldout" and report["data"]["blocks"] == 6
    assert report["kind"] == "evaluate" and report["config"]["baseline"] == str(tiny_gpt2_dir)


def test_gates_all_open_match_the_base(tmp_path, tiny_gpt2_dir, tiny_text_file, capsys):
    ckpt = make_checkpoint(tmp_path / "open", tiny_gpt2_dir, tiny_text_file, bias=1e4)
    report = run_json(["evaluate", str(ckpt), "--max-batches", "1", "--batch-size", "4"], capsys)
    assert report["model"]["density"] == 1.0
    assert report["model"]["sequences"] == report["base"]["sequences"] == 4
    assert abs(report["ce_gap"]) < 1e-5


def test_plain_model_with_text_file_gives_dense_numbers(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "report"
    report = run_json(["evaluate", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--seq-len", "16",
                       "--max-batches", "2", "--out", str(out)], capsys)
    assert report["base"] is None and report["ce_gap"] is None
    assert not report["model"]["gated"] and report["model"]["density"] is None
    assert report["model"]["sequences"] == 16 and report["data"]["split"] == "all"
    assert json.loads((out / "evaluate.json").read_text()) == report


def test_table_when_not_json(ckpt, capsys):
    main(["evaluate", str(ckpt), "-q", "--max-batches", "1"])
    out = capsys.readouterr().out
    assert "cross-entropy" in out and "perplexity" in out and "sparse" in out and "CE gap" in out


def _break_missing_file(ckpt):
    (ckpt / "model.safetensors").unlink()


def _break_truncate(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])


def _break_corrupt_same_size(ckpt):  # the manifest's sizes still match: the loader itself must fail cleanly
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64 + data[64:])


def _break_schema(ckpt):
    meta = json.loads((ckpt / "spartan.json").read_text())
    (ckpt / "spartan.json").write_text(json.dumps({**meta, "schema_version": 99}))


def _break_lose_meta(ckpt):
    (ckpt / "spartan.json").unlink()


@pytest.mark.parametrize("command", ["evaluate", "density"])
@pytest.mark.parametrize("breaks, message", [
    (_break_missing_file, "model.safetensors' is missing"),
    (_break_truncate, "truncated"),
    (_break_corrupt_same_size, "could not be loaded"),
    (_break_schema, "schema_version 99"),
    (_break_lose_meta, "no spartan.json"),
])
def test_broken_checkpoints_give_one_line(ckpt, breaks, message, command, capsys):
    breaks(ckpt)
    err = one_line_error([command, str(ckpt)], capsys)
    assert message in err


def test_unknown_task_and_missing_model_give_one_line(ckpt, tmp_path, capsys):
    err = one_line_error(["evaluate", str(ckpt), "--task", "nope"], capsys)
    assert "task 'nope' is unknown; choose one of addition" in err
    err = one_line_error(["evaluate", str(tmp_path / "nowhere")], capsys)
    assert "does not exist" in err
    err = one_line_error(["evaluate", str(ckpt), "--task", "addition"], capsys)  # a BPE tokenizer cannot do it
    assert "built-in addition tokenizer" in err


def test_registry_names_and_arguments():
    assert sorted(TASKS) == ["addition", "custom", "greater-than", "induction", "ioi"]
    assert get_task("addition") is TASKS["addition"]
    with pytest.raises(TaskError, match="takes no argument"):
        get_task("greater-than:file.jsonl")
    with pytest.raises(TaskError, match="addition corruption 'file.jsonl' is unknown"):
        get_task("addition:file.jsonl")
    with pytest.raises(TaskError, match="choose one of addition"):
        get_task("ioi-typo")
    assert default_task("addition") is TASKS["addition"] and default_task(None) is None
    assert default_task("shakespeare") is TASKS["induction"]


class _Oracle(torch.nn.Module):
    """Predicts each next token of an addition problem exactly, except on the rows it is told to miss."""

    def __init__(self, miss=()):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # exact_match reads the device from a parameter
        self.miss = set(miss)

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)  # (batch, pos): the token each position should predict
        a = input_ids[:, 0] * 10 + input_ids[:, 1]
        b = input_ids[:, 3] * 10 + input_ids[:, 4]
        wrong = torch.tensor([(int(x), int(y)) in self.miss for x, y in zip(a, b)])
        nxt[wrong, -2] = (nxt[wrong, -2] + 1) % 10  # last answer digit wrong
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, 13).float()})


def test_addition_task_counts_exact_matches():
    from spartan_cli.builtin import addition

    tok = addition.build_tokenizer()
    task = get_task("addition")
    data = task.build(tok)
    assert isinstance(data, TaskData) and data.clean.shape == (10_000, 11)
    assert torch.equal(data.clean[100 * 53 + 21], addition.encode([(53, 21)])[0])
    assert task.score(_Oracle(), data).value("accuracy") == 1.0
    _, heldout = addition.split_pairs()
    result = task.score(_Oracle(miss=heldout[:250]), data)
    assert result.value("accuracy") == (10_000 - 250) / 10_000
    assert result.value("accuracy_heldout_pairs") == 0.75
    assert result.metric("accuracy_heldout_pairs").examples == 1000
    from spartan_cli.tasks import TaskResult

    assert TaskResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_addition_task_refuses_other_tokenizers(tiny_tokenizer):
    with pytest.raises(TaskError, match="needs the built-in addition tokenizer"):
        get_task("addition").build(tiny_tokenizer)
