"""Gated attention against the model's dense attention, on a randomly initialised GPT-2-small-shaped model
(12 layers x 12 heads, d_model 768, vocab 50,257). Issue 6's targets, printed as ratios measured side by side:
  (a) gated training step / dense fine-tuning step       target <= 1.15x
  (b) peak memory of a training step, gated / dense      target <= 1.3x
  (c) deterministic-gate eval forward / dense forward    target <= 1.1x
  (d) how (a) and (b) grow with sequence length (128 -> 4096): the memory a gated step adds should grow no
      more than 1.2x sdpa's growth (the tiled path, chosen above ``--chunk-mb``, keeps nothing of size q x k).
"Dense" is the same model with its normal attention: ``sdpa`` (transformers' default) and ``eager`` (the
materialised softmax), both reported.

Run explicitly (marker ``benchmark``; off by default), or as a script:
    pytest -m benchmark tests/benchmarks/bench_attention.py -s
    python tests/benchmarks/bench_attention.py [--threads 1] [--batch 4] [--seq 256] [--sweep 128,256,512,1024]
    python tests/benchmarks/bench_attention.py --skip-point --sweep 128,1024,4096 --sweep-batch 1 \
        --impls spartan,sdpa --chunk-mb 0.25      # (d) with every gated call tiled; eager at 4k needs > 10 GiB
A training step is what the trainer does: forward with labels, loss (gated: CE + beta * R with R the mean
gate-open probability, recorded by the attention), backward, gradient clipping, fused AdamW step; dropout off.
Times: one model whose attention implementation is switched between steps, implementations interleaved in
every round (shared CPUs drift), the best of ``repeats`` rounds after a warm-up round (other jobs on shared
cores only ever slow a run down; the medians are kept in the JSON too).
Memory: each (implementation, length) in a fresh process (glibc told to return large blocks at once):
  peak     the process's peak resident memory during a step (weights, gradients, AdamW state, activations)
  step     that peak minus the resident memory before the step (what the step itself adds)
  saved    bytes autograd keeps for the backward (unique storages, parameters excluded)
On CUDA (``--device cuda``): steps under bf16 autocast (the trainer's dtype auto), memory the peak of
torch.cuda's allocated bytes during a step, in this process; ``--impls`` may add ``flash`` (sdpa held to its
FlashAttention kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

THREADS = 1  # shared CPU cores: keep to one unless told otherwise
DENSE = ("sdpa", "eager")
IMPLS = ("spartan",) + DENSE
FLASH = "flash"  # CUDA only: sdpa restricted to its FlashAttention kernel (bf16 under autocast)
BETA = 0.01  # any positive multiplier: the regulariser's backward is part of a gated step
ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cpu")  # --device cuda: steps under bf16 autocast (as the trainer's dtype auto), CUDA memory


def gpt2_small(seed: int = 0, chunk_mb: float | None = None, positions: int = 1024):
    """``chunk_mb``: the gated attention's tiling threshold (None: the default, attention.CHUNK_MB);
    ``positions``: learned positions (GPT-2's 1,024, more for longer sweeps)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from spartan_cli.gating.attention import CHUNK_MB, attach_gates

    torch.manual_seed(seed)
    cfg = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout off, as in post-training
                     n_positions=max(1024, positions))
    model = GPT2LMHeadModel(cfg)  # the GPT-2 small shape, random weights
    attach_gates(model, chunk_mb=CHUNK_MB if chunk_mb is None else chunk_mb)  # set_impl picks what runs
    return model.to(DEVICE)


def set_impl(model, impl: str) -> None:
    model.set_attn_implementation("sdpa" if impl == FLASH else impl)


def _context(impl: str):
    """bf16 autocast on CUDA, and for ``flash`` sdpa held to its FlashAttention kernel."""
    from contextlib import ExitStack

    stack = ExitStack()
    if DEVICE.type == "cuda":
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    if impl == FLASH:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
    return stack


def batch_ids(batch: int, seq: int, vocab: int = 50257, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)  # (batch, pos)


class Trainer:
    """One model, one fused AdamW; ``step(impl)`` is a full training step with that attention."""

    def __init__(self, model):
        from spartan_cli.gating.attention import gate_states

        self.model = model.train()
        self.states = gate_states(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.95), fused=True)

    def loss(self, ids, impl: str):
        from spartan_cli.gating.scopes import recording

        set_impl(self.model, impl)
        gated = impl == "spartan"
        with recording(self.model) if gated else nullcontext(), _context(impl):
            out = self.model(input_ids=ids, labels=ids)
            loss = out.loss.float()
            if gated:
                reg = torch.stack([s.stats.density_term.mean() for s in self.states]).mean()
                loss = loss + BETA * reg
        return loss

    def step(self, ids, impl: str) -> None:
        self.loss(ids, impl).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def time_steps(model, *, batch: int, seq: int, repeats: int, impls=IMPLS) -> dict:
    """Median seconds of a training step and of a no-grad eval forward, per implementation."""
    trainer = Trainer(model)
    ids = batch_ids(batch, seq, model.config.vocab_size)
    step_s = {impl: [] for impl in impls}
    fwd_s = {impl: [] for impl in impls}

    def forward(impl):
        set_impl(model, impl)
        model.eval()
        try:
            with torch.no_grad(), _context(impl):
                model(input_ids=ids)
        finally:
            model.train()

    for r in range(repeats + 1):  # round 0 warms up (allocator, AdamW state, kernels)
        for impl in impls:
            s = _timed(lambda: trainer.step(ids, impl))
            f = min(_timed(lambda: forward(impl)) for _ in range(2))
            if r:
                step_s[impl].append(s)
                fwd_s[impl].append(f)
    return {"step_s": {k: min(v) for k, v in step_s.items()},
            "forward_s": {k: min(v) for k, v in fwd_s.items()},
            "step_median_s": {k: statistics.median(v) for k, v in step_s.items()},
            "forward_median_s": {k: statistics.median(v) for k, v in fwd_s.items()},
            "samples": {"step_s": step_s, "forward_s": fwd_s}}


# ---- memory, one fresh process per measurement ----

def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(impl: str, batch: int, seq: int, chunk_mb: float | None = None) -> dict:
    """In this process: peak resident memory of one training step of ``impl`` (after a warm-up step)."""
    model = gpt2_small(chunk_mb=chunk_mb, positions=seq)
    trainer = Trainer(model)
    ids = batch_ids(batch, seq)
    trainer.step(ids, impl)  # allocates AdamW state; the measured step starts from the resting state
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    rest = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.loss(ids, impl)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)
    peak = _rss_bytes("VmHWM")
    return {"impl": impl, "batch": batch, "seq": seq, "peak": peak, "step": peak - rest, "saved": sum(saved.values())}


def cuda_memory(impl: str, batch: int, seq: int, chunk_mb: float | None = None) -> dict:
    """On CUDA, in this process: peak allocated memory of one training step (after a warm-up step)."""
    model = gpt2_small(chunk_mb=chunk_mb, positions=seq)
    trainer = Trainer(model)
    ids = batch_ids(batch, seq)
    trainer.step(ids, impl)
    torch.cuda.synchronize()
    rest = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step(ids, impl)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del trainer, model
    torch.cuda.empty_cache()
    return {"impl": impl, "batch": batch, "seq": seq, "peak": peak, "step": peak - rest, "saved": 0}


def memory(impl: str, *, batch: int, seq: int, threads: int, chunk_mb: float | None = None) -> dict:
    if DEVICE.type == "cuda":
        return cuda_memory(impl, batch, seq, chunk_mb)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--memory-worker", impl, "--batch", str(batch), "--seq", str(seq),
           "--threads", str(threads)] + ([] if chunk_mb is None else ["--chunk-mb", str(chunk_mb)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- report ----

def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report_point(t: dict, mem: dict, *, batch: int, seq: int) -> list[str]:
    g = "spartan"
    dense = [d for d in DENSE + (FLASH,) if d in mem]
    lines = [f"GPT-2 small shape, batch {batch} x seq {seq}:"]
    for d in dense:
        lines.append(f"  (a) training step   gated {t['step_s'][g]:.2f} s / {d} {t['step_s'][d]:.2f} s = "
                     f"{t['step_s'][g] / t['step_s'][d]:.3f}x (target <= 1.15x)")
    for d in dense:
        lines.append(f"  (b) peak memory     gated {_gib(mem[g]['peak'])} / {d} {_gib(mem[d]['peak'])} = "
                     f"{mem[g]['peak'] / mem[d]['peak']:.3f}x (target <= 1.3x); step adds "
                     f"{_gib(mem[g]['step'])} / {_gib(mem[d]['step'])} = {mem[g]['step'] / mem[d]['step']:.3f}x; "
                     f"saved for backward {_gib(mem[g]['saved'])} / {_gib(mem[d]['saved'])} = "
                     f"{mem[g]['saved'] / mem[d]['saved']:.3f}x")
    for d in dense:
        lines.append(f"  (c) eval forward    gated {t['forward_s'][g] * 1e3:.0f} ms / {d} "
                     f"{t['forward_s'][d] * 1e3:.0f} ms = {t['forward_s'][g] / t['forward_s'][d]:.3f}x "
                     "(target <= 1.1x)")
    return lines


def measure(*, batch: int = 4, seq: int = 256, repeats: int = 3, threads: int = THREADS,
            chunk_mb: float | None = None, impls=IMPLS) -> dict:
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time_steps(gpt2_small(chunk_mb=chunk_mb, positions=seq), batch=batch, seq=seq, repeats=repeats,
                       impls=impls)
    finally:
        torch.set_num_threads(saved_threads)
    mem = {impl: memory(impl, batch=batch, seq=seq, threads=threads, chunk_mb=chunk_mb) for impl in impls}
    return {"batch": batch, "seq": seq, "threads": threads, "chunk_mb": chunk_mb, "time": t, "memory": mem}


def sweep_lines(points: list[dict]) -> list[str]:
    """(d): per length, the gated step's time and added memory over each dense implementation's, each
    implementation's step-memory growth from the shortest length, and the gated growth over sdpa's (target <= 1.2x)."""
    impls = list(points[0]["memory"])
    dense = [d for d in DENSE + (FLASH,) if d in impls]
    lines = ["  (d)   seq  " + "  ".join(f"step s gated/{d}  memory gated/{d}" for d in dense)
             + "  memory growth " + " ".join(impls) + "   gated growth / sdpa growth"]
    first = points[0]["memory"]
    for p in points:
        t, m = p["time"]["step_s"], p["memory"]
        growth = {i: m[i]["step"] / first[i]["step"] for i in impls}
        cols = "  ".join(f"{t['spartan']:6.2f}/{t[d]:6.2f} = {t['spartan'] / t[d]:5.2f}x  "
                         f"{m['spartan']['step'] / m[d]['step']:9.2f}x" for d in dense)
        ratio = f"{growth['spartan'] / growth['sdpa']:.2f}x" if "sdpa" in growth else "-"
        lines.append(f"      {p['seq']:5d}  {cols}  " + " ".join(f"{growth[i]:6.2f}x" for i in impls) + f"   {ratio}")
    return lines


@pytest.mark.benchmark
def test_gated_attention_costs_little_over_dense():
    r = measure(repeats=2)
    lines = report_point(r["time"], r["memory"], batch=r["batch"], seq=r["seq"])
    print("\n" + "\n".join(lines))
    step = r["time"]["step_s"]
    assert step["spartan"] / step["sdpa"] < 2.0, lines  # regression guards; the targets are reported, not enforced
    assert r["memory"]["spartan"]["peak"] / r["memory"]["sdpa"]["peak"] < 2.0, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--sweep", default="", help="comma-separated lengths for (d), e.g. 128,256,512,1024")
    parser.add_argument("--sweep-batch", type=int, default=None, help="batch for (d) [--batch]")
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--skip-point", action="store_true", help="only the (d) sweep")
    parser.add_argument("--chunk-mb", type=float, default=None,
                        help="gated attention's tiling threshold and tile size in MiB (small: every call tiled)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="implementations to measure [spartan,sdpa,eager]; on CUDA also flash")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    parser.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(memory_worker(args.memory_worker, args.batch, args.seq, args.chunk_mb)))
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    impls = tuple(args.impls.split(","))
    known = IMPLS + ((FLASH,) if DEVICE.type == "cuda" else ())
    if "spartan" not in impls or not set(impls) <= set(known):
        parser.error(f"--impls must include spartan and name only {', '.join(known)}, got {args.impls!r}")
    results = {}
    if not args.skip_point:
        r = measure(batch=args.batch, seq=args.seq, repeats=args.repeats, threads=args.threads, chunk_mb=args.chunk_mb,
                    impls=impls)
        results["point"] = r
        print("\n".join(report_point(r["time"], r["memory"], batch=args.batch, seq=args.seq)), flush=True)
    if args.sweep:
        sb = args.sweep_batch or args.batch
        points = []
        for seq in (int(s) for s in args.sweep.split(",")):
            points.append(measure(batch=sb, seq=seq, repeats=args.sweep_repeats, threads=args.threads,
                                  chunk_mb=args.chunk_mb, impls=impls))
            print(f"  ... seq {seq} measured", flush=True)
        results["sweep"] = points
        print(f"(d) growth with sequence length, batch {sb}, {args.threads} thread(s):")
        print("\n".join(sweep_lines(points)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
