"""spartan: sparse attention post-training, density measurement and circuit discovery.

The Python API mirrors the commands; each function takes what the command takes (model names and paths,
settings as keyword arguments named like the config fields) and returns the command's typed result::

    model, tokenizer = spartan_cli.load("runs/addition")               # gated model, deterministic gates
    run = spartan_cli.sparsify("addition", out="runs/addition", train={"steps": 200})   # run.RunResult
    ev = spartan_cli.evaluate("runs/addition")                          # evaluate.EvaluateRun
    dn = spartan_cli.density("runs/addition", prompt="53+21=00074")     # density.DensityRun
    cr = spartan_cli.find_circuit("runs/addition", method="eap-ig")     # circuit.run.CircuitRun
    ex = spartan_cli.export("runs/addition", format="hf", out="exported/addition")  # export.ExportResult

Importing this package is cheap (no torch): the functions import what they need. It also makes the gated
attention known to transformers, so ``AutoModelForCausalLM.from_pretrained`` loads an ``export --format hf``
directory: at once if transformers' model code is already imported, else the moment it is (see
``registration``).

Package layout: ``hf`` (loading, adapters, registration), ``gating`` (gate kinds, the attention paths,
scopes), ``training`` (GECO, the trainer, runs, checkpoints, presets, processes), ``measure`` (held-out
CE and density, the evaluate and density verbs, reports, pictures), ``circuit``, ``tasks``, ``builtin``,
``exports``, ``cli``. No module is named like an API function, so ``spartan_cli.density`` is always the
function.
"""

from spartan_cli.hf import registration as _registration

__version__ = "0.1.0"

__all__ = ["__version__", "density", "evaluate", "export", "find_circuit", "load", "sparsify", "to_hooked"]

_registration.install()


def to_hooked(model, tokenizer=None):
    """A TransformerLens HookedTransformer running ``model`` (gated: its deterministic gates as hooks on
    hook_attn_scores / hook_pattern). Needs transformer-lens 3.x: pip install 'spartan-cli[lens]'. See hf.lens."""
    from spartan_cli.hf.lens import to_hooked as _to_hooked

    return _to_hooked(model, tokenizer)


def load(path, **kwargs):
    """Load a spartan checkpoint directory -> (gated model in eval mode, tokenizer). See checkpoint.load
    (keywords ``device``, ``dtype``)."""
    from spartan_cli.training.checkpoint import load as _load

    return _load(path, **kwargs)


def sparsify(model, data=None, cfg=None, *, out=None, config=None, resume: bool = False, overwrite: bool = False,
             on_step=None, should_stop=None, **sections):
    """``spartan sparsify MODEL --out OUT``: post-train the model named ``model`` -> run.RunResult.

    Settings merge as on the command line: the built-in model's preset < the ``config`` file (YAML/JSON
    path or dict) < ``sections`` given here (``data=``, ``gate=``, ``geco=``, ``train=`` dicts, named like
    the config file's sections). ``on_step`` receives each logged train.StepRecord.

    Given a model object instead of a name, this is the in-memory trainer ``train.sparsify(model, data,
    cfg)`` (a gated model, Splits, SparsifyConfig) -> (SparsifyResult, TrainerState).
    """
    if not isinstance(model, str):
        from spartan_cli.training.train import sparsify as _train

        return _train(model, data, cfg, on_step=on_step, should_stop=should_stop, resume=resume or None,
                      **sections)
    from spartan_cli.config import read_config_file
    from spartan_cli.training.presets import preset_for
    from spartan_cli.training.run import RunConfig, merge, run_sparsify

    given = dict(sections)
    if data is not None:
        given["data"] = {"source": data} if isinstance(data, str) else data
    if cfg is not None:
        raise TypeError("cfg= is for the in-memory trainer (a model object); pass settings as sections, e.g. train={...}")
    file_cfg = read_config_file(config) if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__") else (
        config or {})
    merged = merge(merge(preset_for(model), file_cfg), given)
    merged["model"] = model
    if out is not None:
        merged["out"] = str(out)
    return run_sparsify(RunConfig.from_dict(merged), overwrite=overwrite, resume=resume, on_step=on_step,
                        should_stop=should_stop, command="spartan_cli.sparsify")


def evaluate(model: str, **settings):
    """``spartan evaluate MODEL``: CE, perplexity, density and task metrics beside the base model ->
    evaluate.EvaluateRun. ``settings``: the fields of evaluate.EvaluateConfig (data, task, baseline, ...)."""
    from spartan_cli.measure.evaluate import evaluate_run, EvaluateConfig

    on_progress = settings.pop("on_progress", None)
    return evaluate_run(EvaluateConfig.from_dict({"model": str(model), **settings}), on_progress=on_progress)


def density(model: str, **settings):
    """``spartan density MODEL``: density overall/per layer/per head, keys per query, prompt attention ->
    density.DensityRun. ``settings``: the fields of density.DensityConfig (data, prompt, max_batches, ...)."""
    from spartan_cli.measure.density import DensityConfig, density_run

    on_progress = settings.pop("on_progress", None)
    return density_run(DensityConfig.from_dict({"model": str(model), **settings}), on_progress=on_progress)


def find_circuit(model: str, **settings):
    """``spartan circuit MODEL``: a task's circuit by edge attribution and patching ->
    circuit.run.CircuitRun. ``settings``: the fields of circuit.driver.CircuitConfig."""
    from spartan_cli.circuit.driver import CircuitConfig
    from spartan_cli.circuit.run import circuit_run

    on_progress = settings.pop("on_progress", None)
    return circuit_run(CircuitConfig.from_dict({"model": str(model), **settings}), on_progress=on_progress)


def export(source, *, format: str, out, **settings):
    """``spartan export SOURCE --format F --out OUT`` -> export.ExportResult. ``settings``: the other
    fields of export.ExportConfig (prompt, data, overwrite, ...)."""
    from spartan_cli.exports import ExportConfig, export as _export

    return _export(ExportConfig.from_dict({"source": str(source), "format": format, "out": str(out), **settings}))
