"""`spartan sparsify` end to end on tiny saved models, and its one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import spartan_cli
from spartan_cli.cli.main import main


def run_cli(args, capsys):
    """Run the CLI in-process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


FAST = ["--steps", "20", "--seq-len", "16", "--batch-size", "4", "--heldout-blocks", "4", "--eval-every", "10",
        "--quiet", "--json"]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_sparsify_tiny_saved_model(arch, request, tiny_text_file, tmp_path, capsys):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["sparsify", str(model_dir), "--data", str(tiny_text_file), "--out", str(out),
                                    *FAST], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["steps"] == 20 and 0.0 <= summary["density"] <= 1.0
    assert summary["step0_density"] > 0.0
    meta = json.loads((out / "spartan.json").read_text())
    assert meta["schema_version"] == 1 and meta["final"]["density"] == summary["density"]
    assert meta["target_loss"] == pytest.approx(summary["target_loss"])
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20 and {"ce", "tau", "beta", "density", "tokens_per_s"} <= set(lines[0])
    model, tok = spartan_cli.load(out)
    assert model.config._attn_implementation == "spartan"
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_flags_override_config_file_even_when_zero(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {{source: {tiny_text_file}, seq_len: 16, heldout_blocks: 4}}\n"
                   "train: {steps: 7, tolerance: 0.5, batch_size: 4}\n")
    code, stdout, stderr = run_cli(["sparsify", str(tiny_gpt2_dir), "--config", str(cfg), "--out",
                                    str(tmp_path / "r"), "--tolerance", "0", "--quiet", "--json"], capsys)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["steps"] == 7  # from the file
    assert summary["tolerance"] == 0.0  # the flag, although 0 is falsy


@pytest.mark.parametrize("case", ["missing_model", "hub_unreachable", "empty_data", "seq_too_long", "out_not_empty",
                                  "negative_steps", "unknown_config_key", "addition_with_data"])
def test_bad_input_is_one_line_and_exit_1(case, tiny_gpt2_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("a user's file")
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train: {stepz: 3}\n")
    m, d = str(tiny_gpt2_dir), str(tiny_text_file)
    out = str(tmp_path / "o")
    args, expect = {
        "missing_model": (["./no-such-model", "--data", d, "--out", out], "does not exist"),
        "hub_unreachable": (["gpt2", "--data", d, "--out", out], "hub is unreachable"),
        "empty_data": ([m, "--data", str(empty), "--out", out], "empty"),
        "seq_too_long": ([m, "--data", d, "--seq-len", "4096", "--out", out], "4096"),
        "out_not_empty": ([m, "--data", d, "--out", str(busy)], "not empty"),
        "negative_steps": ([m, "--data", d, "--steps", "-5", "--out", out], "--steps"),
        "unknown_config_key": ([m, "--config", str(bad_cfg), "--out", out], "stepz"),
        "addition_with_data": (["addition", "--data", d, "--out", out], "drop --data"),
    }[case]
    code, stdout, stderr = run_cli(["sparsify", *args], capsys)
    assert code == 1
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr  # progress lines may precede it
    assert expect in errors[0]
    assert "Traceback" not in stderr
    assert (busy / "keep.txt").read_text() == "a user's file"


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tiny_gpt2_dir, tiny_text_file, tmp_path):
    """A real process killed with SIGTERM mid-run saves a resumable checkpoint; --resume finishes the run."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "spartan_cli.cli.main", "sparsify", str(tiny_gpt2_dir), "--data",
            str(tiny_text_file), "--out", str(out), "--seq-len", "16", "--batch-size", "4", "--heldout-blocks", "4"]
    args = base + ["--steps", "100000", "--log-every", "1", "--eval-every", "0", "--checkpoint-every", "0"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    steps_seen = 0
    deadline = time.time() + 120
    for line in proc.stderr:
        if line.startswith("step "):
            steps_seen += 1
        if steps_seen >= 5 or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    meta = json.loads((out / "spartan.json").read_text())
    saved = meta["step"]
    assert 5 <= saved < 100000
    assert "--resume" in err
    # resume names only the output and the new length: the rest comes from the saved run_config.yaml
    resume = subprocess.run(base[:4] + ["--out", str(out), "--steps", str(saved + 3), "--resume", "--json", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert resume.returncode == 0, resume.stderr
    assert json.loads(resume.stdout)["steps"] == saved + 3
    log_steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(log_steps) and log_steps[-1] == saved + 3
