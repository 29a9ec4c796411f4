import json

import pytest
import torch

from spartan_cli.training import checkpoint
from spartan_cli.gating.attention import attach_gates
from spartan_cli.blocks import Splits, TokenBlocks
from spartan_cli.config import GateConfig, TrainConfig
from spartan_cli.errors import CheckpointError
from spartan_cli.training.train import SparsifyConfig, sparsify
from tests.micro import BUILDERS, VOCAB


class _Tok:
    """The smallest tokenizer stand-in save_pretrained needs (tests of the model files only)."""

    def save_pretrained(self, path):
        (path / "tokenizer_config.json").write_text("{}")


def _splits(seed=0, n=24, pos=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, pos), generator=g)
    return Splits(TokenBlocks(x[:16], x[:16].clone()), TokenBlocks(x[16:], x[16:].clone()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_then_load_is_identity(tmp_path, arch, monkeypatch):
    model = attach_gates(BUILDERS[arch](), GateConfig(bias=0.3))
    checkpoint.save(tmp_path, model, None, meta={"gate": GateConfig(bias=0.3).to_dict()})
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    loaded, _ = checkpoint.load(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.config.spartan_gate["bias"] == 0.3


def test_truncated_weights_are_reported(tmp_path):
    model = attach_gates(BUILDERS["gpt2"]())
    checkpoint.save(tmp_path, model, None, meta={"gate": GateConfig().to_dict()})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        checkpoint.read_meta(tmp_path)


def test_wrong_schema_and_missing_files_are_reported(tmp_path):
    model = attach_gates(BUILDERS["gpt2"]())
    checkpoint.save(tmp_path, model, None, meta={"gate": GateConfig().to_dict()})
    meta = json.loads((tmp_path / "spartan.json").read_text())
    (tmp_path / "spartan.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / "spartan.json").write_text(json.dumps(meta))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*missing"):
        checkpoint.read_meta(tmp_path)
    with pytest.raises(CheckpointError, match="no spartan.json"):
        checkpoint.read_meta(tmp_path / "..")


@pytest.mark.parametrize("reference", ["heldout", "validation"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, reference):
    """Stop after 4 of 8 steps, save, reload, resume: final weights equal the straight 8-step run's (with
    geco.reference "validation" the dense model's validation CE travels in the trainer state)."""
    from spartan_cli.config import GecoConfig

    cfg = SparsifyConfig(train=TrainConfig(steps=8, batch_size=4, lr=1e-3, log_every=1, eval_every=0),
                         geco=GecoConfig(reference=reference, warmup_steps=2))
    straight = attach_gates(BUILDERS["gpt2"]())
    sparsify(straight, _splits(), cfg)

    first = attach_gates(BUILDERS["gpt2"]())
    calls = {"n": 0}

    def stop_after_4():
        calls["n"] += 1
        return calls["n"] > 4

    result, state = sparsify(first, _splits(), cfg, should_stop=stop_after_4)
    assert result.interrupted and state.step == 4
    checkpoint.save(tmp_path, first, None, meta={"gate": GateConfig().to_dict()}, trainer_state=state)

    resumed_state = checkpoint.load_trainer_state(tmp_path)
    assert resumed_state.validation_ref == state.validation_ref
    assert (state.validation_ref is not None) == (reference == "validation")
    resumed = attach_gates(BUILDERS["gpt2"]())
    from safetensors.torch import load_file

    resumed.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    resumed.tie_weights()
    result2, state2 = sparsify(resumed, _splits(), cfg, resume=resumed_state)
    assert state2.step == 8 and not result2.interrupted
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writes_honour_the_umask_like_a_plain_open(tmp_path, mask):
    import os
    import stat

    from spartan_cli.tasks.custom import Pair, write_pairs

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    old = os.umask(mask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:  # what a user's own open would give
            f.write("x")
        checkpoint.atomic_write_text(tmp_path / "new.json", "{}\n")
        pairs = write_pairs(tmp_path / "pairs.jsonl", [Pair("a b", "a c", ("x",), ("y",))])
    finally:
        os.umask(old)
    assert mode(tmp_path / "new.json") == mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert mode(pairs) == 0o666 & ~mask
    os.chmod(tmp_path / "new.json", 0o600)  # an existing file keeps its mode, as open("w") would leave it
    checkpoint.atomic_write_text(tmp_path / "new.json", "[]\n")
    assert mode(tmp_path / "new.json") == 0o600 and (tmp_path / "new.json").read_text() == "[]\n"
    with pytest.raises(RuntimeError):  # an error mid-write leaves the old file and no temp file
        with checkpoint.atomic_open(tmp_path / "new.json") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert (tmp_path / "new.json").read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "pairs.jsonl", "plain.txt"]

    old = os.umask(mask)
    try:  # a whole checkpoint, whose safetensors files the library itself would write 0o600
        ckpt = checkpoint.save(tmp_path / "ckpt", BUILDERS["gpt2"](), None, meta={})
    finally:
        os.umask(old)
    modes = {p.name: mode(p) for p in ckpt.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}, modes
