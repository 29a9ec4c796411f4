"""``spartan sparsify MODEL --out CKPT``: gated attention + GECO post-training."""

from __future__ import annotations

import json
import signal
import sys

import click

from spartan_cli.cli.options import Flag, add_flags, apply_flags
from spartan_cli.training.distributed import PARALLEL  # torch-free at import

FLAGS = [
    Flag("--data", "data", "source", str, "Training text: a .txt/.jsonl/.parquet file, a folder of them, or a hub dataset."),
    Flag("--text-field", "data", "text_field", str, "Field holding the text in jsonl/parquet/hub rows [text]."),
    Flag("--seq-len", "data", "seq_len", click.IntRange(min=1), "Tokens per training block [128]."),
    Flag("--heldout-blocks", "data", "heldout_blocks", click.IntRange(min=1), "Blocks held out for the target and evaluation [64]."),
    Flag("--max-tokens", "data", "max_tokens", click.IntRange(min=1), "Read at most this many tokens of data."),
    Flag("--steps", "train", "steps", click.IntRange(min=1), "Optimizer steps [1000]."),
    Flag("--batch-size", "train", "batch_size", click.IntRange(min=1), "Blocks per micro-batch [8]."),
    Flag("--grad-accum", "train", "grad_accum", click.IntRange(min=1), "Micro-batches per optimizer step [1]."),
    Flag("--lr", "train", "lr", click.FloatRange(min=0, min_open=True), "Peak learning rate [1e-4]."),
    Flag("--schedule", "train", "schedule", click.Choice(["constant", "cosine", "linear"]), "Learning-rate decay after warm-up [cosine]."),
    Flag("--lr-warmup", "train", "lr_warmup_steps", click.IntRange(min=0), "Learning-rate warm-up steps [50]."),
    Flag("--weight-decay", "train", "weight_decay", click.FloatRange(min=0), "AdamW weight decay [0]."),
    Flag("--tolerance", "train", "tolerance", click.FloatRange(min=0), "Nats added to the base loss to form the target [0]."),
    Flag("--trainable", "train", "trainable", click.Choice(["all", "attention"]), "Weights that train [all]."),
    Flag("--lora-rank", "train", "lora_rank", click.IntRange(min=1),
         "Train LoRA adapters of this rank instead of the weights (needs peft: pip install 'spartan-cli[lora]'); "
         "the checkpoint holds the merged model and the adapter [off]."),
    Flag("--lora-alpha", "train", "lora_alpha", click.FloatRange(min=0, min_open=True),
         "LoRA scale numerator: adapters add (alpha / rank) B A [the rank]."),
    Flag("--lora-targets", "train", "lora_targets", str,
         "Comma-separated module-name endings to adapt, e.g. q_proj,v_proj [every attention projection]."),
    Flag("--seed", "train", "seed", int, "Seed for data order and gate noise [0]."),
    Flag("--device", "train", "device", str, "auto (cuda if present), cpu, cuda, cuda:N [auto]."),
    Flag("--dtype", "train", "dtype", click.Choice(["auto", "float32", "bfloat16"]), "auto: bf16 autocast on CUDA, fp32 on CPU; gate maths is fp32 [auto]."),
    Flag("--parallel", "train", "parallel", click.Choice(sorted(PARALLEL)),
         "Under torchrun / accelerate launch: ddp (each rank holds the whole model) or fsdp (weights, gradients and "
         "optimizer state sharded per decoder block, for models that do not fit one GPU) [ddp]."),
    Flag("--log-every", "train", "log_every", click.IntRange(min=1), "Log a step every N steps [10]."),
    Flag("--eval-every", "train", "eval_every", click.IntRange(min=0), "Held-out evaluation every N steps, 0 = end only [200]."),
    Flag("--checkpoint-every", "train", "checkpoint_every", click.IntRange(min=0), "Resumable checkpoint every N steps, 0 = end only [500]."),
    Flag("--gate-bias", "gate", "bias", float, "Constant b in g = q.k/sqrt(d) + b; larger opens more gates at the start [2.0]."),
    Flag("--gate-kind", "gate", "kind", str, "Gate parameterisation [paper]."),
    Flag("--beta-init", "geco", "beta_init", click.FloatRange(min=0, min_open=True), "Initial sparsity weight beta [1e-3]."),
    Flag("--geco-rate", "geco", "rate", click.FloatRange(min=0), "Log-space step of beta per unit of relative constraint [0.05]."),
    Flag("--geco-smoothing", "geco", "smoothing", click.FloatRange(min=0, max=1, max_open=True), "Moving-average factor of CE - target [0.99]."),
    Flag("--geco-warmup", "geco", "warmup_steps", click.IntRange(min=0), "Steps before beta may move [50]."),
    Flag("--geco-reference", "geco", "reference", click.Choice(["heldout", "batch", "validation"]),
         "What each step's CE is held against: heldout = base held-out CE + tolerance; batch = a frozen copy of the "
         "base model's CE on the same rows + tolerance (less noise; one more forward and model copy); validation = "
         "the deterministic-gate CE of rows never trained on against the dense model's on the same rows "
         "(the built-in's own, else 5% of the training blocks) [heldout]."),
    Flag("--geco-gates", "geco", "gates", click.Choice(["sampled", "deterministic"]),
         "Gates of the CE the constraint reads: the training forward's sampled ones, or deterministic 1[g > 0] "
         "(one more no-grad forward per step) [sampled]."),
    Flag("--constraint", "geco", "constraint", click.Choice(["ce", "kl"]),
         "What is trained and held to the tolerance: ce = cross-entropy against the data; kl = KL(dense || sparse) "
         "of next-token distributions, with a frozen dense copy as teacher (needs --geco-reference batch or "
         "validation) [ce]."),
    Flag("--tolerance-start", "geco", "tolerance_start", click.FloatRange(min=0),
         "Slack (nats) the constraint starts with, narrowed linearly to --tolerance by the settle phase; "
         "ignored when not above --tolerance [none: --tolerance from step 0; shakespeare: 0.1]."),
]


@click.command("sparsify")
@click.argument("model", required=False)
@click.option("--out", "-o", "out", type=click.Path(file_okay=False), default=None, help="Checkpoint directory to write.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML/JSON run config (sections model, out, data, gate, geco, train); flags win.")
@add_flags(FLAGS)
@click.option("--resume", is_flag=True, help="Continue the run saved in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out directory.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run (off by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@click.pass_context
def command(ctx, model, out, config_file, resume, overwrite, trust_remote_code, as_json, quiet, **_flags):
    """Post-train MODEL (hub id, local HF directory, .gguf file, or built-in `addition` / `shakespeare`)
    so that its attention becomes sparse at the base model's loss; writes a checkpoint directory to --out.

    \b
    Examples:
      spartan sparsify addition --out runs/addition
      spartan sparsify shakespeare --out runs/shakespeare
      spartan sparsify gpt2 --data ./text.txt --seq-len 256 --steps 20000 --out runs/gpt2
    """
    from spartan_cli.cli.evaluate import quiet_loading
    from spartan_cli.config import read_config_file
    from spartan_cli.training.presets import preset_for
    from spartan_cli.training.run import RunConfig, merge, run_sparsify

    quiet_loading()  # transformers' per-load/per-save bars: our progress (or --quiet) says enough

    file_cfg = read_config_file(config_file) if config_file else {}
    if resume and out is not None:  # the saved run's settings come back below the config file and flags
        from pathlib import Path

        saved = Path(out) / "run_config.yaml"
        file_cfg = merge(read_config_file(saved), file_cfg) if saved.is_file() else file_cfg
    model = model or file_cfg.get("model")
    merged = merge(preset_for(model) if model else {}, file_cfg)
    apply_flags(ctx, merged, FLAGS)
    if model is not None:
        merged["model"] = model
    if out is not None:
        merged["out"] = out
    if trust_remote_code:
        merged["trust_remote_code"] = True
    cfg = RunConfig.from_dict(merged)
    from spartan_cli.training.distributed import env_world

    reporting = env_world().is_main  # under torchrun / accelerate launch, rank 0 alone reports
    quiet = quiet or not reporting

    stop = {"signal": None}

    def handler(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    from spartan_cli.cli.progress import TrainProgress

    try:
        with TrainProgress(cfg.train.steps, quiet=quiet) as progress:
            result = run_sparsify(cfg, overwrite=overwrite, resume=resume, on_step=progress.on_step,
                                  on_event=progress.say, should_stop=lambda: stop["signal"] is not None,
                                  command=" ".join(["spartan"] + sys.argv[1:]))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if not reporting:
        return 128 + int(stop["signal"] or signal.SIGTERM) if result.interrupted else 0
    if result.interrupted:
        click.echo(f"interrupted at step {result.summary['steps']}: checkpoint saved in {result.out}; continue with "
                   f"`spartan sparsify {cfg.model} --out {result.out} --resume`", err=True)
        if as_json:
            click.echo(json.dumps(result.summary, indent=2))
        return 128 + int(stop["signal"])
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        _print_summary(result.summary)
    return 0


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"spartan sparsify: {s['model']} -> {s['out']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("steps", s["steps"]), ("base CE (target - tolerance)", f"{s['base_ce']:.4f}"),
            ("target CE", f"{s['target_loss']:.4f}"), ("sparse CE (deterministic gates)", f"{s['ce']:.4f}"),
            ("density at step 0", f"{s['step0_density']:.2%}"), ("density", f"{s['density']:.2%}"),
            ("beta", f"{s['beta']:.4g}"), ("tokens/s", f"{s['tokens_per_s']:,.0f}")]
    if "accuracy" in s:
        rows.append(("exact-match accuracy", f"{s['accuracy']:.2%}"))
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
