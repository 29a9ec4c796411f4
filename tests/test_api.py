"""The Python API mirrors the commands: the package's functions give the numbers the CLI gives, and they stay
functions when their same-named modules are imported."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import spartan_cli
from spartan_cli.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_api_names_stay_functions_after_their_modules_are_imported():
    for name in ("density", "evaluate", "export", "train", "run"):
        importlib.import_module(f"spartan_cli.{name}")
    for name in spartan_cli.__all__:
        if name != "__version__":
            assert callable(getattr(spartan_cli, name)) and not isinstance(getattr(spartan_cli, name), type(sys)), name
    assert sys.modules["spartan_cli.density"].DensityConfig  # the module is still reachable
    assert spartan_cli.run is sys.modules["spartan_cli.run"]  # names outside the API bind as usual


def test_unknown_settings_name_the_valid_ones(tmp_path):
    from spartan_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="valid keys are .*max_batches"):
        spartan_cli.density(tmp_path, max_batch=3)
    with pytest.raises(ConfigError, match="export format 'nope' is unknown; choose one of .*graphml"):
        spartan_cli.export(tmp_path, format="nope", out=tmp_path / "x")


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, tiny_gpt2_dir, tiny_text_file):
    """examples/api.py's main on a tiny GPT-2: 3 steps of sparsify, density, export, plain load."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        api = importlib.import_module("api")
    finally:
        sys.path.remove(str(EXAMPLES))
    out = tmp_path_factory.mktemp("api") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run, dens = api.main(model=str(tiny_gpt2_dir), out=str(out), steps=3,
                             data={"source": str(tiny_text_file), "seq_len": 16, "heldout_blocks": 4})
    finally:
        torch.set_num_threads(threads)
    return out, run, dens


def test_example_script_runs_and_its_numbers_agree(example_run, capsys):
    out, run, dens = example_run
    assert run.summary["steps"] == 3 and (out / "spartan.json").is_file()
    # the density the run reports is the one `density` recounts on the same held-out blocks
    assert dens.result.to_dict()["overall"]["density"] == pytest.approx(run.summary["density"], abs=1e-12)
    assert (Path(str(out) + "-hf") / "config.json").is_file()


def test_api_evaluate_equals_the_cli(example_run, capsys):
    out, run, _ = example_run
    ev = spartan_cli.evaluate(out, compare_base=False, device="cpu")
    assert ev.result.model.ce == pytest.approx(run.summary["ce"], rel=1e-6)
    capsys.readouterr()
    main(["evaluate", str(out), "--no-baseline", "--json", "-q"])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["ce"] == pytest.approx(ev.result.model.ce, rel=1e-12)


def test_gpt2_recipe_is_a_valid_run_config():
    from spartan_cli.config import read_config_file
    from spartan_cli.data import DataConfig
    from spartan_cli.run import RunConfig

    cfg = RunConfig.from_dict(read_config_file(EXAMPLES / "gpt2-paper.yaml"))  # strict: unknown keys fail
    DataConfig.from_dict(cfg.data)
    assert cfg.model == "gpt2" and cfg.data["seq_len"] == 1024
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data["seq_len"]
    assert tokens == pytest.approx(3.3e9, rel=0.01)  # the figure the file's time estimate is based on
