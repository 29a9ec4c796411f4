"""Training throughput of sparsify on a GPT-2-small-shaped model (random weights, random tokens):
tokens/s of the GECO loop (forward with sampled gates, backward, AdamW) and the wall time the
paper-scale recipe (examples/gpt2-paper.yaml) would take at that rate.

    python tests/benchmarks/bench_sparsify_throughput.py --device cuda --seq-len 1024 --batch-size 32
    pytest -m benchmark tests/benchmarks/bench_sparsify_throughput.py

The first step (allocation, kernel selection) is excluded from the rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import yaml

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "gpt2-paper.yaml"


def measure_throughput(*, device: str = "cpu", seq_len: int = 256, batch_size: int = 4, steps: int = 4,
                       n_layer: int = 12, dtype: str = "auto") -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.blocks import Splits, TokenBlocks
    from spartan_cli.config import GecoConfig, TrainConfig
    from spartan_cli.training.train import SparsifyConfig, sparsify

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, vocab_size=50257, n_positions=max(1024, seq_len))
    model = GPT2LMHeadModel(cfg).to(device)
    attach_gates(model)
    ids = torch.randint(0, cfg.vocab_size, (batch_size * 2 + 1, seq_len))
    blocks = TokenBlocks(ids, ids.clone())
    data = Splits(train=blocks.slice(0, batch_size * 2), heldout=blocks.slice(batch_size * 2, batch_size * 2 + 1))
    records = []
    train = TrainConfig(steps=steps, batch_size=batch_size, log_every=1, eval_every=0, eval_batches=1,
                        checkpoint_every=0, device=device, dtype=dtype, lr_warmup_steps=0)
    sparsify(model, data, SparsifyConfig(geco=GecoConfig(warmup_steps=0), train=train), on_step=records.append)
    first, last = records[0], records[-1]
    tokens = (last.step - first.step) * batch_size * seq_len
    return tokens / (last.elapsed_s - first.elapsed_s)


def recipe_hours(tokens_per_s: float) -> float:
    recipe = yaml.safe_load(RECIPE.read_text())
    t, d = recipe["train"], recipe["data"]
    return t["steps"] * t["batch_size"] * t["grad_accum"] * d["seq_len"] / tokens_per_s / 3600


@pytest.mark.benchmark
def test_throughput_is_reported():
    rate = measure_throughput(seq_len=128, batch_size=2, steps=3, n_layer=2)
    print(f"\n{rate:,.0f} tokens/s (2-layer GPT-2-small width, seq 128, CPU)")
    assert rate > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    rate = measure_throughput(device=a.device, seq_len=a.seq_len, batch_size=a.batch_size, steps=a.steps,
                              dtype=a.dtype)
    print(f"GPT-2 small, seq {a.seq_len}, batch {a.batch_size}, {a.device}: {rate:,.0f} tokens/s")
    print(f"examples/gpt2-paper.yaml at this rate: {recipe_hours(rate):,.1f} hours on one such device")
    sys.exit(0)
