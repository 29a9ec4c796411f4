"""Bad values for every command's options (types, ranges, non-finite numbers, paths, config files): each
one ends the command with exit code 1 and exactly one line on stderr starting ``error:``, never a traceback.

Most cases fail while the command reads its arguments (no model is loaded); the rest load the tiny
saved GPT-2 of conftest.py, so every case takes well under a second.
"""

from __future__ import annotations

import pytest

from spartan_cli.cli.main import main

MODEL, TEXT, OUT, FILE, DIR, BUSY, CKPT = "{model}", "{text}", "{out}", "{file}", "{dir}", "{busy}", "{ckpt}"

SPARSIFY = [MODEL, "--data", TEXT, "--out", OUT, "--quiet"]
SPARSIFY_BAD = {
    "steps not a number": ["--steps", "abc"],
    "steps zero": ["--steps", "0"],
    "steps negative": ["--steps", "-3"],
    "steps fractional": ["--steps", "1.5"],
    "batch size zero": ["--batch-size", "0"],
    "grad accum zero": ["--grad-accum", "0"],
    "seq len zero": ["--seq-len", "0"],
    "seq len beyond the model": ["--seq-len", "100000"],
    "heldout blocks zero": ["--heldout-blocks", "0"],
    "max tokens zero": ["--max-tokens", "0"],
    "lr zero": ["--lr", "0"],
    "lr negative": ["--lr", "-1e-4"],
    "lr nan": ["--lr", "nan"],
    "lr inf": ["--lr", "inf"],
    "lr word": ["--lr", "fast"],
    "schedule unknown": ["--schedule", "step"],
    "warmup negative": ["--lr-warmup", "-1"],
    "weight decay negative": ["--weight-decay", "-0.1"],
    "tolerance negative": ["--tolerance", "-0.5"],
    "tolerance nan": ["--tolerance", "nan"],
    "tolerance inf": ["--tolerance", "inf"],
    "trainable unknown": ["--trainable", "mlp"],
    "seed fractional": ["--seed", "1.5"],
    "device unknown": ["--device", "gpu"],
    "device cuda without cuda": ["--device", "cuda:3"],
    "dtype unknown": ["--dtype", "float16"],
    "log every zero": ["--log-every", "0"],
    "eval every negative": ["--eval-every", "-1"],
    "checkpoint every negative": ["--checkpoint-every", "-1"],
    "gate bias word": ["--gate-bias", "high"],
    "gate bias nan": ["--gate-bias", "nan"],
    "gate bias inf": ["--gate-bias", "-inf"],
    "gate kind unknown": ["--gate-kind", "renormalised"],
    "beta init zero": ["--beta-init", "0"],
    "beta init above max": ["--beta-init", "1e9"],
    "geco rate negative": ["--geco-rate", "-1"],
    "geco smoothing one": ["--geco-smoothing", "1"],
    "geco smoothing nan": ["--geco-smoothing", "nan"],
    "geco warmup negative": ["--geco-warmup", "-1"],
    "unknown option": ["--stepz", "3"],
    "data missing": ["--data", "/no/such/text.txt"],
    "data empty folder": ["--data", DIR],
    "config missing": ["--config", "/no/such/run.yaml"],
    "config a folder": ["--config", DIR],
    "config not yaml": ["--config", "{cfg_broken}"],
    "config a list": ["--config", "{cfg_list}"],
    "config section not a mapping": ["--config", "{cfg_section}"],
    "config data section not a mapping": ["--config", "{cfg_data_section}"],
    "config value of the wrong type": ["--config", "{cfg_type}"],
    "config data value of the wrong type": ["--config", "{cfg_data_type}"],
    "out is a file": ["--out", FILE],
    "out not empty": ["--out", BUSY],
    "resume and overwrite": ["--resume", "--overwrite"],
    "resume without a run": ["--out", "{out}/never", "--resume"],
}
SPARSIFY_OTHER = {
    "no model": ["sparsify", "--out", OUT, "--quiet"],
    "model missing": ["sparsify", "/no/such/model", "--data", TEXT, "--out", OUT, "--quiet"],
    "model is a text file": ["sparsify", FILE, "--data", TEXT, "--out", OUT, "--quiet"],
    "model an empty folder": ["sparsify", DIR, "--data", TEXT, "--out", OUT, "--quiet"],
    "no data for a real model": ["sparsify", MODEL, "--out", OUT, "--quiet"],
}

EVALUATE = ["evaluate", CKPT, "--no-baseline", "-q", "--max-batches", "1"]
EVALUATE_BAD = {
    "batch size zero": ["--batch-size", "0"],
    "batch size word": ["--batch-size", "many"],
    "max batches zero": ["--max-batches", "0"],
    "seq len one": ["--seq-len", "1"],
    "seq len beyond the model": ["--data", TEXT, "--seq-len", "100000"],
    "device unknown": ["--device", "tpu"],
    "task unknown": ["--task", "sorting"],
    "task custom file missing": ["--task", "custom:/no/such.jsonl"],
    "data missing": ["--data", "/no/such.txt"],
    "out is a file": ["--out", FILE],
}
EVALUATE_OTHER = {
    "baseline missing": ["evaluate", CKPT, "--baseline", "/no/such/model", "-q", "--max-batches", "1"],
    "model missing": ["evaluate", "/no/such/ckpt", "-q"],
    "model is a text file": ["evaluate", FILE, "-q"],
}

DENSITY = ["density", CKPT, "-q", "--max-batches", "1"]
DENSITY_BAD = {
    "plot without out": ["--plot"],
    "batch size zero": ["--batch-size", "0"],
    "max batches zero": ["--max-batches", "0"],
    "seq len one": ["--seq-len", "1"],
    "gate bias nan": ["--gate-bias", "nan"],
    "gate bias word": ["--gate-bias", "wide"],
    "device unknown": ["--device", "gpu"],
    "data missing": ["--data", "/no/such.txt"],
    "out is a file": ["--out", FILE],
}

CIRCUIT = ["circuit", "addition", "-q", "--n-examples", "4"]
CIRCUIT_BAD = {
    "faithfulness zero": ["--faithfulness", "0"],
    "faithfulness above one": ["--faithfulness", "1.5"],
    "faithfulness nan": ["--faithfulness", "nan"],
    "method unknown": ["--method", "acdc"],
    "ig steps zero": ["--ig-steps", "0"],
    "examples zero": ["--n-examples", "0"],
    "batch size zero": ["--batch-size", "0"],
    "selection unknown": ["--selection", "random"],
    "delta buffer negative": ["--max-delta-mb", "-1"],
    "delta buffer nan": ["--max-delta-mb", "nan"],
    "seed word": ["--seed", "x"],
    "task unknown": ["--task", "sorting"],
    "task custom file missing": ["--task", "custom:/no/such.jsonl"],
    "device unknown": ["--device", "gpu"],
}
CIRCUIT_OTHER = {
    "model missing": ["circuit", "/no/such/ckpt", "--task", "ioi", "-q"],
    "no task for a model without one": ["circuit", MODEL, "-q"],
}

CASES = {
    **{f"sparsify: {k}": SPARSIFY_BAD[k] and ["sparsify", *SPARSIFY, *SPARSIFY_BAD[k]] for k in SPARSIFY_BAD},
    **{f"sparsify: {k}": v for k, v in SPARSIFY_OTHER.items()},
    **{f"evaluate: {k}": [*EVALUATE, *v] for k, v in EVALUATE_BAD.items()},
    **{f"evaluate: {k}": v for k, v in EVALUATE_OTHER.items()},
    **{f"density: {k}": [*DENSITY, *v] for k, v in DENSITY_BAD.items()},
    **{f"circuit: {k}": [*CIRCUIT, *v] for k, v in CIRCUIT_BAD.items()},
    **{f"circuit: {k}": v for k, v in CIRCUIT_OTHER.items()},
}


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_gpt2_dir, tiny_text_file):
    """Paths the cases name: a model, a text, a file, an empty folder, a busy folder, broken configs, a checkpoint."""
    from spartan_cli.training import checkpoint
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.config import GateConfig

    root = tmp_path_factory.mktemp("fuzz")
    (root / "file.txt").write_text("not a model, not a folder")
    (root / "empty").mkdir()
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("a user's file")
    (root / "broken.yaml").write_text("train: {steps: 3\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "section.yaml").write_text("train: 5\n")
    (root / "data_section.yaml").write_text("data: [a, b]\n")
    (root / "type.yaml").write_text("train: {steps: ten}\n")
    (root / "data_type.yaml").write_text("data: {seq_len: long}\n")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = attach_gates(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir), GateConfig(bias=0.5))
    ckpt = root / "ckpt"
    checkpoint.save(ckpt, model, AutoTokenizer.from_pretrained(tiny_gpt2_dir),
                    meta={"gate": GateConfig(bias=0.5).to_dict(), "base_model": str(tiny_gpt2_dir),
                          "base_model_name": str(tiny_gpt2_dir), "data": {"source": str(tiny_text_file), "seq_len": 16}})
    return {"model": str(tiny_gpt2_dir), "text": str(tiny_text_file), "out": str(root / "out"),
            "file": str(root / "file.txt"), "dir": str(root / "empty"), "busy": str(root / "busy"),
            "ckpt": str(ckpt), "cfg_broken": str(root / "broken.yaml"), "cfg_list": str(root / "list.yaml"),
            "cfg_section": str(root / "section.yaml"), "cfg_data_section": str(root / "data_section.yaml"), "cfg_type": str(root / "type.yaml"),
            "cfg_data_type": str(root / "data_type.yaml")}


SLOW = {"evaluate: baseline missing"}  # the baseline is loaded after the checkpoint has been measured


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in sorted(CASES)])
def test_bad_value_is_one_line_and_exit_1(case, places, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [a.format(**places) for a in CASES[case]]
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    err = capsys.readouterr().err
    assert exc.value.code == 1, (args, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert len(lines[0]) < 600, lines[0]  # a sentence, not a dump
