"""LoRA against full fine-tuning of a gated model: trainable parameters, training-step time, peak memory.

On SmolLM2-135M (the offline asset; ``python tests/offline_assets.py fetch``), or with ``--tiny`` a random
Llama-shaped model. A step is the trainer's: gated forward with labels, CE + beta * density term, backward,
gradient clipping, fused AdamW over the parameters that train (all weights, or the LoRA adapters alone).
Times: both set-ups built once and interleaved in every round (shared CPUs drift), best of ``repeats``
after a warm-up step. Memory: each set-up in a fresh process, the peak resident memory of one step after a
warm-up step (AdamW state allocated), and what the step adds to the memory before it.

    python tests/benchmarks/bench_lora.py [--rank 16] [--batch 4] [--seq 256] [--threads 2] [--tiny]
    pytest -m benchmark tests/benchmarks/bench_lora.py -s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BETA = 0.01


def build(kind: str, rank: int, tiny: bool):
    """The gated model for ``kind`` = full | lora, and the parameters that train."""
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.training.lora import add_lora
    from spartan_cli.training.train import trainable_parameters

    if tiny:
        from tests.micro import BUILDERS

        model = BUILDERS["llama"]()
    else:
        from transformers import AutoModelForCausalLM

        from tests.offline_assets import smollm2_dir

        path = smollm2_dir()
        if path is None:
            raise SystemExit("SmolLM2-135M not fetched: python tests/offline_assets.py fetch (or pass --tiny)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    attach_gates(model)
    if kind == "lora":
        add_lora(model, rank)
    params = trainable_parameters(model, "lora" if kind == "lora" else "all")
    return model.train(), params


class Step:
    def __init__(self, model, params):
        from spartan_cli.gating.attention import gate_states

        self.model, self.params, self.states = model, params, gate_states(model)
        self.opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=True)

    def __call__(self, ids) -> None:
        from spartan_cli.gating.scopes import recording

        with recording(self.model):
            loss = self.model(input_ids=ids, labels=ids).loss.float()
            loss = loss + BETA * torch.stack([s.stats.density_term.mean() for s in self.states]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _ids(model, batch: int, seq: int):
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_worker(kind: str, rank: int, batch: int, seq: int, tiny: bool) -> dict:
    model, params = build(kind, rank, tiny)
    step, ids = Step(model, params), _ids(model, batch, seq)
    step(ids)  # AdamW state allocated
    rest = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak := now
    step(ids)
    peak = _rss("VmHWM")
    return {"kind": kind, "peak": peak, "step": peak - rest}


def memory(kind: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--memory-worker", kind, "--rank", str(args.rank), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)] + (["--tiny"] if args.tiny else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    setups = {kind: build(kind, args.rank, args.tiny) for kind in ("full", "lora")}
    steps = {kind: Step(*setup) for kind, setup in setups.items()}
    ids = _ids(setups["full"][0], args.batch, args.seq)
    times = {kind: [] for kind in steps}
    for r in range(args.repeats + 1):
        for kind, step in steps.items():
            t = time.perf_counter()
            step(ids)
            if r:  # round 0 warms up
                times[kind].append(time.perf_counter() - t)
    n_params = {kind: sum(p.numel() for p in setups[kind][0].parameters()) for kind in setups}
    trainable = {kind: sum(p.numel() for p in setups[kind][1]) for kind in setups}
    del setups, steps
    mem = {kind: memory(kind, args) for kind in ("full", "lora")}
    return {"rank": args.rank, "batch": args.batch, "seq": args.seq, "threads": args.threads, "tiny": args.tiny,
            "parameters": n_params, "trainable": trainable, "step_s": {k: min(v) for k, v in times.items()},
            "memory": mem}


def report(r: dict) -> list[str]:
    t, m, n = r["step_s"], r["memory"], r["trainable"]
    gib = 2.0**30
    return [f"{'tiny Llama' if r['tiny'] else 'SmolLM2-135M'}, LoRA rank {r['rank']} on the attention projections, "
            f"batch {r['batch']} x {r['seq']} tokens, {r['threads']} thread(s):",
            f"  trainable parameters  full {n['full']:,} / LoRA {n['lora']:,} ({n['lora'] / n['full']:.2%})",
            f"  training step         full {t['full']:.2f} s / LoRA {t['lora']:.2f} s = {t['lora'] / t['full']:.2f}x",
            f"  peak memory           full {m['full']['peak'] / gib:.2f} GiB / LoRA {m['lora']['peak'] / gib:.2f} GiB "
            f"= {m['lora']['peak'] / m['full']['peak']:.2f}x; the step adds {m['full']['step'] / gib:.2f} / "
            f"{m['lora']['step'] / gib:.2f} GiB"]


@pytest.mark.benchmark
def test_lora_trains_fewer_parameters_in_less_memory():
    args = argparse.Namespace(rank=8, batch=2, seq=32, threads=1, repeats=2, tiny=True)
    r = measure(args)
    print("\n" + "\n".join(report(r)))
    assert r["trainable"]["lora"] < r["trainable"]["full"] / 5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2-135M")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(args.memory_worker, args.rank, args.batch, args.seq, args.tiny)))
        return
    r = measure(args)
    print("\n".join(report(r)))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
