"""Data-parallel sparsify: a run's numbers do not depend on how many processes compute them.

Fast checks of the two rules that make that true (rows sliced from one global batch; gate noise per global
row), and a slow end-to-end check: two gloo processes on CPU under torchrun, stopped and resumed halfway,
against one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from spartan_cli.training import distributed
from spartan_cli.errors import ConfigError
from spartan_cli.gating.gates import gate_kind


def test_local_rows_partition_the_global_batch():
    rows = torch.arange(10, 22)  # a global micro-batch of 12 rows
    parts = [distributed.local_rows(rows, distributed.World(rank=r, size=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), rows)
    with pytest.raises(ConfigError, match="multiple of 5"):
        distributed.check_batch(12, distributed.World(rank=0, size=5))


def _row_gens(seed: int, index: int, rows: range):
    return [torch.Generator().manual_seed(distributed.row_seed(seed, index, r)) for r in rows]


def test_gate_noise_depends_on_the_global_row_not_on_the_split():
    """Rows 0-3 sampled in one forward equal rows 0-1 and 2-3 sampled on two 'ranks', layer after layer."""
    kind = gate_kind("paper")
    g = torch.randn(2, 4, 3, 6, 6)  # (layers, batch, n_heads, q, k)
    whole = _row_gens(0, 7, range(4))
    halves = [_row_gens(0, 7, range(0, 2)), _row_gens(0, 7, range(2, 4))]
    for layer in range(2):  # each layer draws the next noise of every row's own stream
        one = kind.sample(g[layer], generator=whole)
        two = torch.cat([kind.sample(g[layer, :2], generator=halves[0]), kind.sample(g[layer, 2:], generator=halves[1])])
        assert torch.equal(one, two)
    assert not torch.equal(kind.sample(g[0], generator=_row_gens(0, 8, range(4))), kind.sample(g[0], generator=_row_gens(0, 7, range(4))))
    # each row's samples are Bernoulli(sigmoid(g)): the mean over many rows approaches sigmoid(g)
    big = torch.zeros(4000, 1, 1, 1) + 0.7
    mean = kind.sample(big, generator=_row_gens(1, 0, range(4000))).mean()
    assert abs(float(mean) - float(torch.sigmoid(torch.tensor(0.7)))) < 0.03


def test_single_process_world_needs_no_process_group(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_from_env("cpu") == distributed.SINGLE
    t = torch.tensor([1.0, 2.0])
    assert distributed.sum_across(t, distributed.SINGLE) is t
    assert distributed.wrap(torch.nn.Linear(2, 2), distributed.SINGLE).__class__ is torch.nn.Linear


def test_parallel_is_a_registry_checked_by_the_config_and_the_cli(tmp_path, capsys):
    from spartan_cli.cli.main import main
    from spartan_cli.cli.sparsify import FLAGS
    from spartan_cli.config import TrainConfig

    assert sorted(distributed.PARALLEL) == ["ddp", "fsdp"] and TrainConfig().parallel == "ddp"
    assert TrainConfig.from_dict({"parallel": "fsdp"}).parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig.from_dict({"parallel": "zero3"})
    with pytest.raises(ConfigError, match="train.parallel must be one of ddp, fsdp"):
        distributed.parallel("zero3")
    flag = next(f for f in FLAGS if f.decl == "--parallel")
    assert sorted(flag.type.choices) == sorted(distributed.PARALLEL)
    with pytest.raises(SystemExit) as exc:
        main(["sparsify", "addition", "--out", str(tmp_path / "o"), "--parallel", "zero3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) == 1 and "zero3" in err[0], err


# ------------------------------------------------- FSDP plumbing in one process (a process group of one)
@pytest.fixture()
def group_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield distributed.World()
    finally:
        dist.destroy_process_group()


def _sharded_twin(world):
    from tests import micro

    plain, twin = micro.gpt2(seed=5), micro.gpt2(seed=5)
    assert distributed.PARALLEL["fsdp"].wrap(twin, world) is twin and distributed.sharded(twin)
    assert not distributed.sharded(plain) and distributed.full_state_dict(plain, world) is None
    return plain, twin


def test_fsdp_checkpoint_is_the_unsharded_models(group_of_one, tmp_path):
    """A sharded model's gathered weights, written by checkpoint.save, are the plain model's file."""
    from safetensors.torch import load_file

    from spartan_cli.training import checkpoint

    plain, twin = _sharded_twin(group_of_one)
    assert type(twin.transformer.h[0].attn.c_attn.weight).__name__ == "DTensor"
    full = distributed.full_state_dict(twin, group_of_one)
    ref = plain.state_dict()
    assert full.keys() == ref.keys() and all(torch.equal(full[k], ref[k]) for k in ref)
    assert full["lm_head.weight"] is full["transformer.wte.weight"]  # the tie survives the gather
    checkpoint.save(tmp_path / "a", plain, None, meta={})
    checkpoint.save(tmp_path / "b", twin, None, meta={}, state_dict=full)
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "b/config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]


def test_fsdp_optimizer_state_gathers_and_shards_back(group_of_one):
    """AdamW moments of a sharded model gather into the plain model's layout (what a checkpoint holds), and
    cut back into shards they load as the same moments (what --resume does)."""
    plain, twin = _sharded_twin(group_of_one)
    ids = torch.arange(24).view(2, 12) % 61
    opts = []
    for model in (plain, twin):
        opts.append(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True))
        model(input_ids=ids, labels=ids).loss.backward()
        opts[-1].step()
    ref, got = opts[0].state_dict(), distributed.optimizer_state(opts[1], group_of_one)
    assert ref["state"].keys() == got["state"].keys() and got["param_groups"] == ref["param_groups"]
    for idx, entry in ref["state"].items():
        for k, v in entry.items():
            assert type(got["state"][idx][k]) is torch.Tensor and torch.allclose(got["state"][idx][k], v, atol=1e-7)
    fresh = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    fresh.load_state_dict(distributed.shard_optimizer_state(got, fresh))
    for p in twin.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            loaded, kept = fresh.state[p][k], opts[1].state[p][k]
            assert type(loaded) is type(kept) and loaded.placements == kept.placements
            assert torch.equal(loaded.full_tensor(), kept.full_tensor())


# ------------------------------------------------------------------------------------------ end to end
RUN_YAML = """\
gate: {bias: 0.0}
geco: {settle_fraction: 0.0, warmup_steps: 0, rate: 2.0, max_log_step: 0.5, beta_init: 0.01}
train: {schedule: constant, lr_warmup_steps: 0, lr: 0.003}
"""


def _args(model_dir, text_file, out, config, steps):
    return ["sparsify", str(model_dir), "--data", str(text_file), "--out", str(out), "--config", str(config),
            "--seq-len", "16", "--heldout-blocks", "4", "--batch-size", "4", "--grad-accum", "2",
            "--steps", str(steps), "--log-every", "1", "--eval-every", "3", "--checkpoint-every", "3",
            "--device", "cpu", "--seed", "3", "--json", "-q"]


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "spartan_cli.cli.main", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(done.stdout)  # rank 0 alone prints


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _reference(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    """The one-process run both wrappers are held to (one thread, like each torchrun rank)."""
    from spartan_cli.cli.main import main

    config = tmp_path / "run.yaml"
    config.write_text(RUN_YAML)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(_args(tiny_gpt2_dir, tiny_text_file, one, config, 6))
    finally:
        torch.set_num_threads(threads)
    return config, one, json.loads(capsys.readouterr().out)


@pytest.mark.slow  # two torchrun launches of two interpreters each, per wrapper (~30 s on 2 busy cores)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_a_resume_match_one_process(parallel, tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    config, one, ref = _reference(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys)
    two = tmp_path / "two"
    how = ["--parallel", parallel]
    half = _torchrun(_args(tiny_gpt2_dir, tiny_text_file, two, config, 3) + how, tmp_path)
    assert half["steps"] == 3
    full = _torchrun(_args(tiny_gpt2_dir, tiny_text_file, two, config, 6) + how + ["--resume"], tmp_path)
    assert full["steps"] == 6 and ref["steps"] == 6

    a, b = _log(one), _log(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert a[-1]["beta"] != a[0]["beta"]  # the multiplier moved, so its synchronisation is tested
    assert 0.05 < a[0]["density"] < 0.95 and a[-1]["density"] != a[0]["density"]  # gates half open and moving
    for ra, rb in zip(a, b):
        for key in ("ce", "reg", "density", "beta", "c_ma", "tau"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key, ra[key], rb[key])
    for key in ("base_ce", "target_loss", "ce", "density", "beta", "step0_density"):
        assert full[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    # the checkpoint is what one process writes: same files, same keys and shapes, full (unsharded) tensors
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert json.loads((two / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    start = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    moved = max(float((wa[k] - start[k]).abs().max()) for k in wa if k in start)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert moved > 1e-3 and diff < 1e-4 * max(moved, 1.0), (moved, diff)
    gap = {k: max(abs(ra[k] - rb[k]) for ra, rb in zip(a, b)) for k in ("ce", "density", "beta")}
    print(f"{parallel}: max |2 procs - 1 proc| per step {gap}, final weights {diff:.2g} (moved {moved:.2g})")
    assert not list(two.glob(".staging-*"))  # rank 0 alone wrote, and finished


@pytest.mark.slow  # one accelerate launch of two interpreters (~20 s on 2 busy cores)
def test_accelerate_launch_matches_one_process(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys):
    """``accelerate launch --multi_gpu --num_processes 2`` runs the same data-parallel training as torchrun: the
    one-process run's per-step CE, density and multiplier, its final figures, and a checkpoint that says 2."""
    config, one, ref = _reference(tiny_gpt2_dir, tiny_text_file, tmp_path, capsys)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    # --multi_gpu is accelerate's torchrun-style launcher; on a machine without CUDA the ranks take gloo on CPU
    # (accelerate's --cpu would start one process only)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spartan_cli.cli.main",
           *_args(tiny_gpt2_dir, tiny_text_file, two, config, 6)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    full = json.loads(done.stdout)
    assert json.loads((two / "spartan.json").read_text())["processes"] == 2
    assert json.loads((one / "spartan.json").read_text())["processes"] == 1
    for ra, rb in zip(_log(one), _log(two), strict=True):
        for key in ("ce", "reg", "density", "beta", "tau"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    for key in ("ce", "density", "beta"):
        assert full[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
