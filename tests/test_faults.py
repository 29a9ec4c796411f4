"""The fault table: what a run does when the world misbehaves, through the CLI as a user meets it.

| fault                                         | expected                                                         |
|-----------------------------------------------|------------------------------------------------------------------|
| SIGTERM / SIGINT mid-run, then --resume       | exit 128 + signal, resumable checkpoint; the resumed run ends on |
|                                               | the same weights, bit for bit, as an uninterrupted run (CPU)     |
| NaN / inf loss on some steps                  | those steps are skipped (train_log says so), the run finishes    |
| NaN / inf loss on every step                  | one line "error: loss was non-finite ...", exit 1                |
| non-finite weights at save time               | nothing written; no checkpoint ever holds a NaN or inf           |
| truncated model/trainer-state safetensors     | one line naming the file, exit 1 (evaluate, --resume)            |
| hand-edited spartan.json / trainer_state.json | one line naming the file, exit 1                                 |
| disk full (ENOSPC) at any write of a save     | one line error, exit 1; the previous checkpoint loads unchanged  |
Signals are real (sent to this process from the progress callback, caught by the CLI's own handlers).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import ATTENTION_PATHS, attach_gates
from spartan_cli.cli.main import main
from spartan_cli.config import GateConfig
from spartan_cli.errors import CheckpointError
from tests.micro import BUILDERS
from tests.test_cli_sparsify import run_cli

STEPS = 6
ARGS = ["--seq-len", "16", "--batch-size", "4", "--heldout-blocks", "4", "--eval-every", "0", "--log-every", "1",
        "--lr", "1e-3", "--geco-warmup", "0", "--quiet", "--json"]


def one_line_error(code, stderr, *, exit_code=1) -> str:
    assert code == exit_code, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def sparsify(model_dir, text, out, capsys, *extra):
    return run_cli(["sparsify", str(model_dir), "--data", str(text), "--out", str(out), *ARGS, *extra], capsys)


def weights(ckpt) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


def all_finite(ckpt) -> bool:
    return all(torch.isfinite(t).all() for name in ("model.safetensors", checkpoint.STATE_TENSORS)
               if (ckpt / name).is_file() for t in load_file(str(ckpt / name)).values() if t.is_floating_point())


@pytest.fixture(scope="module")
def straight_run(tiny_gpt2_dir, tiny_text_file, tmp_path_factory):
    """The uninterrupted reference run (STEPS steps, seed 0)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    main(["sparsify", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--out", str(out), *ARGS,
          "--steps", str(STEPS)])  # returns on success (exits only with a non-zero code)
    return out


def _signal_at(monkeypatch, step: int, signum: int):
    """Send ``signum`` to this process right after ``step`` is logged (the CLI's handler catches it)."""
    from spartan_cli.cli.progress import TrainProgress

    original = TrainProgress.on_step

    def on_step(self, rec):
        original(self, rec)
        if rec.step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(TrainProgress, "on_step", on_step)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_then_resume_ends_on_the_uninterrupted_weights(signum, straight_run, tiny_gpt2_dir, tiny_text_file,
                                                              tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _signal_at(monkeypatch, 2, signum)
    code, stdout, stderr = sparsify(tiny_gpt2_dir, tiny_text_file, out, capsys, "--steps", str(STEPS))
    assert code == 128 + signum, stderr
    assert json.loads(stdout)["interrupted"] and "--resume" in stderr
    assert json.loads((out / "spartan.json").read_text())["step"] == 2
    monkeypatch.undo()
    code, stdout, stderr = run_cli(["sparsify", "--out", str(out), "--resume", "--quiet", "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == STEPS
    resumed, straight = weights(out), weights(straight_run)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # bit for bit


def _poison_training_calls(monkeypatch, bad_steps: set, value: float):
    """The gated attention's output becomes ``value`` (NaN or inf) in the training forwards of ``bad_steps``
    (1-based), so the loss of those steps is non-finite; held-out measurement (eval mode) stays clean."""
    fused = ATTENTION_PATHS["fused"]
    calls = {"n": 0}

    def poisoned(module, state, *args):
        out, weights = fused(module, state, *args)
        if module.training:
            calls["n"] += 1
            step = (calls["n"] - 1) // state_layers(module) + 1
            if step in bad_steps:
                out = out * value
        return out, weights

    def state_layers(_module):
        return 2  # the tiny GPT-2 has two layers: one call each per training step

    monkeypatch.setitem(ATTENTION_PATHS, "fused", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan")], ids=["nan"])  # inf: the next test
def test_non_finite_steps_are_skipped_and_never_saved(value, tiny_gpt2_dir, tiny_text_file, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "run"
    _poison_training_calls(monkeypatch, {2, 3}, value)
    code, stdout, stderr = sparsify(tiny_gpt2_dir, tiny_text_file, out, capsys, "--steps", "5",
                                    "--checkpoint-every", "2")
    assert code == 0, stderr
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["skipped"]] == [2, 3]
    assert json.loads(stdout)["steps"] == 5
    assert all_finite(out)


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("inf")], ids=["inf"])  # nan: the test above
def test_non_finite_loss_every_step_stops_with_one_line(value, tiny_gpt2_dir, tiny_text_file, tmp_path, capsys,
                                                        monkeypatch):
    out = tmp_path / "run"
    _poison_training_calls(monkeypatch, set(range(2, 100)), value)
    code, _, stderr = sparsify(tiny_gpt2_dir, tiny_text_file, out, capsys, "--steps", "8", "--checkpoint-every", "1")
    line = one_line_error(code, stderr)
    assert "non-finite for 3 steps in a row" in line and "--lr" in line
    assert json.loads((out / "spartan.json").read_text())["step"] == 3  # saved after the skipped steps 2 and 3
    assert all_finite(out)


def test_non_finite_weights_are_never_written(tmp_path):
    model = attach_gates(BUILDERS["gpt2"]())
    checkpoint.save(tmp_path, model, None, meta={"gate": GateConfig().to_dict()})
    before = weights(tmp_path)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="transformer.h.0.attn.c_attn.weight.*NaN or inf"):
        checkpoint.save(tmp_path, model, None, meta={"gate": GateConfig().to_dict()})
    after = weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.name.startswith(".staging") for p in tmp_path.iterdir())


@pytest.fixture(scope="module")
def interrupted_run(tiny_gpt2_dir, tiny_text_file, tmp_path_factory):
    """A run stopped by SIGTERM after 2 of 4 steps: a checkpoint with a resumable trainer state."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as m:
        _signal_at(m, 2, signal.SIGTERM)
        with pytest.raises(SystemExit) as exc:
            main(["sparsify", str(tiny_gpt2_dir), "--data", str(tiny_text_file), "--out", str(out), *ARGS,
                  "--steps", "4"])
    assert exc.value.code == 128 + signal.SIGTERM
    return out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# (what is broken, how, the command that meets it, words the one-line error must hold)
BROKEN = {
    "truncated model weights": (lambda c: _truncate(c / "model.safetensors"), "evaluate", "model.safetensors"),
    "truncated weights, resume": (lambda c: _truncate(c / "model.safetensors"), "resume", "model.safetensors"),
    "spartan.json not JSON": (lambda c: (c / "spartan.json").write_text("{\"schema_version\": 1,"), "evaluate",
                              "not valid JSON"),
    "spartan.json schema edited": (lambda c: _edit_json(c / "spartan.json", lambda d: d.update(schema_version=7)),
                                   "evaluate", "schema_version 7"),
    "spartan.json manifest edited": (lambda c: _edit_json(c / "spartan.json",
                                                          lambda d: d["manifest"].update({"model.safetensors": 12})),
                                     "evaluate", "expected 12"),
    "spartan.json gate removed": (lambda c: _edit_json(c / "spartan.json", lambda d: d.pop("gate")), "evaluate",
                                  "gate"),
    "spartan.json gate bias not a number": (
        lambda c: _edit_json(c / "spartan.json", lambda d: d["gate"].update(bias="high")), "evaluate", "bias"),
    "spartan.json gate unknown key": (
        lambda c: _edit_json(c / "spartan.json", lambda d: d["gate"].update(colour="red")), "evaluate", "colour"),
    "spartan.json a list": (lambda c: (c / "spartan.json").write_text("[1, 2]"), "evaluate", "spartan.json"),
    "trainer_state.json edited": (lambda c: _edit_json(c / checkpoint.STATE_JSON, lambda d: d.pop("geco")), "resume",
                                  checkpoint.STATE_JSON),
    "trainer_state.safetensors garbage": (
        lambda c: _garble(c / checkpoint.STATE_TENSORS), "resume", checkpoint.STATE_TENSORS),
}


def _garble(path):
    """Same size (the manifest check passes), unreadable content."""
    path.write_bytes(b"\xff" * path.stat().st_size)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_one_line_error(case, interrupted_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    breaks, command, words = BROKEN[case]
    breaks(out)
    if command == "evaluate":
        args = ["evaluate", str(out), "--no-baseline", "--quiet", "--json"]
    else:
        args = ["sparsify", "--out", str(out), "--resume", "--quiet", "--json"]
    code, _, stderr = run_cli(args, capsys)
    assert words in one_line_error(code, stderr)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _count_fsyncs(tmp_path, model) -> int:
    calls = {"n": 0}
    real = os.fsync

    def counting(fd):
        calls["n"] += 1
        return real(fd)

    try:
        os.fsync = counting
        checkpoint.save(tmp_path / "count", model, None, meta={"gate": GateConfig().to_dict()})
    finally:
        os.fsync = real
    return calls["n"]


def test_disk_full_at_any_write_of_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC injected at each synced write of a save in turn (and inside the tensor writer): the save
    fails with a CheckpointError and the previous checkpoint reads back unchanged."""
    ckpt = tmp_path / "ckpt"
    model = attach_gates(BUILDERS["gpt2"]())
    checkpoint.save(ckpt, model, None, meta={"gate": GateConfig().to_dict(), "step": 1})
    before = weights(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    n = _count_fsyncs(tmp_path, model)
    assert n >= 3
    real = os.fsync
    faults = [f"fsync {i}" for i in range(n)] + ["tensor writer"]
    for fault in faults:
        with monkeypatch.context() as m:
            if fault == "tensor writer":
                m.setattr("safetensors.torch.save_file", _enospc)
                state = _tiny_trainer_state()
            else:
                index, calls = int(fault.split()[1]), {"n": 0}

                def failing(fd, index=index, calls=calls):
                    calls["n"] += 1
                    if calls["n"] - 1 == index:
                        _enospc()
                    return real(fd)

                m.setattr(os, "fsync", failing)
                state = None
            with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
                checkpoint.save(ckpt, model, None, meta={"gate": GateConfig().to_dict(), "step": 2},
                                trainer_state=state)
        assert checkpoint.read_meta(ckpt)["step"] == 1, fault
        after = weights(ckpt)
        assert all(torch.equal(before[k], after[k]) for k in before), fault
        assert not any(p.name.startswith(".") for p in ckpt.iterdir()), fault  # no staging or temp files left


def _tiny_trainer_state():
    from spartan_cli.config import GecoConfig
    from spartan_cli.training.geco import GecoState
    from spartan_cli.training.train import TrainerState

    return TrainerState(step=2, geco=GecoState.initial(GecoConfig()), tau=1.0, base_ce=1.0, step0_density=0.5,
                        optimizer={"state": {}, "param_groups": []}, rng={"torch": torch.get_rng_state()})


@pytest.mark.slow
def test_disk_full_during_a_run_is_one_line_and_resumable(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "run"
    real = checkpoint.save
    saves = {"n": 0}

    def second_save_fails(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            monkeypatch.setattr("safetensors.torch.save_file", _enospc)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", second_save_fails)
    code, _, stderr = sparsify(tiny_gpt2_dir, tiny_text_file, out, capsys, "--steps", "4", "--checkpoint-every", "2")
    line = one_line_error(code, stderr)
    assert "No space left on device" in line and str(out) in line
    monkeypatch.undo()
    assert json.loads((out / "spartan.json").read_text())["step"] == 2  # the step-2 checkpoint, whole
    code, stdout, stderr = run_cli(["sparsify", "--out", str(out), "--resume", "--quiet", "--json"], capsys)
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 4
