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


def test_api_names_stay_functions_after_every_module_is_imported():
    package = Path(spartan_cli.__file__).parent
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__" or "make_" in parts[-1]:
            continue
        importlib.import_module(".".join(parts))
    for name in spartan_cli.__all__:
        if name != "__version__":
            assert callable(getattr(spartan_cli, name)) and not isinstance(getattr(spartan_cli, name), type(sys)), name
    assert sys.modules["spartan_cli.measure.density"].DensityConfig  # the module is reachable by its own name


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
    from spartan_cli.training.run import RunConfig

    cfg = RunConfig.from_dict(read_config_file(EXAMPLES / "gpt2-paper.yaml"))  # strict: unknown keys fail
    DataConfig.from_dict(cfg.data)
    assert cfg.model == "gpt2" and cfg.data["seq_len"] == 1024
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum * cfg.data["seq_len"]
    assert tokens == pytest.approx(3.3e9, rel=0.01)  # the figure the file's time estimate is based on


@pytest.mark.real
def test_ioi_heads_example_measures_where_a_head_looks(tmp_path, gpt2_tokenizer_dir, monkeypatch):
    """examples/ioi_heads.py on a tiny GPT-2 with the real tokenizer: a layer-0 head whose queries and keys
    are zeroed attends uniformly, so IO, S1 and S2 each get 1 / (last position + 1) on average."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from spartan_cli.tasks import get_task

    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, :32] = 0  # q and k of both heads: every score 0
        model.transformer.h[0].attn.c_attn.bias[:32] = 0
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "circuit.json").write_text(json.dumps(
        {"cfg": {"task": "ioi:s2"}, "summary": {"top_heads": [{"name": "a0.h1", "score": 2.0}]}}))
    monkeypatch.syspath_prepend(str(EXAMPLES))
    ioi_heads = importlib.import_module("ioi_heads")
    rows = ioi_heads.head_targets(str(tmp_path / "m"), str(tmp_path / "circuit.json"), n=16)
    batch = get_task("ioi:s2").contrast(tok, n=16, seed=0)
    uniform = float((1.0 / batch.attention_mask.sum(1).double()).mean())  # 1 / (last + 1) per prompt
    assert [r["head"] for r in rows] == ["a0.h1"]
    for where in ("IO", "S1", "S2"):
        assert rows[0][where] == pytest.approx(uniform, abs=1e-5)
    assert rows[0]["other"] == pytest.approx(1 - 3 * uniform, abs=1e-5)

    torch.manual_seed(1)  # large random queries and keys: S1 and S2 get different shares, read off by token text
    peaked = GPT2LMHeadModel(model.config)
    with torch.no_grad():
        peaked.transformer.h[0].attn.c_attn.weight[:, :32] *= 50
    peaked.save_pretrained(tmp_path / "m")
    rows = ioi_heads.head_targets(str(tmp_path / "m"), str(tmp_path / "circuit.json"), n=16)
    random_model = GPT2LMHeadModel.from_pretrained(tmp_path / "m", attn_implementation="eager")
    with torch.no_grad():
        att = random_model(input_ids=batch.clean, attention_mask=batch.attention_mask,
                           output_attentions=True).attentions[0][:, 1]  # (batch, q, k)
    want = torch.zeros(3)
    for i in range(16):
        last = int(batch.attention_mask[i].sum()) - 1
        words = tok.convert_ids_to_tokens(batch.clean[i, :last + 1].tolist())
        io, s = tok.convert_ids_to_tokens(batch.answers[i].tolist())
        s1, s2 = [p for p, w in enumerate(words) if w == s]
        want += torch.stack([att[i, last, words.index(io)], att[i, last, s1], att[i, last, s2]])
    want /= 16
    assert [rows[0][w] for w in ("IO", "S1", "S2")] == pytest.approx(want.tolist(), abs=1e-5)
    assert abs(rows[0]["S1"] - rows[0]["S2"]) > 1e-3
