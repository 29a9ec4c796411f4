"""LoRA adapters for parameter-efficient sparsification (``--lora-rank R``; peft, an optional extra).

Low-rank adapters W + (alpha / R) B A are injected in place into the chosen projections (by default every
linear layer inside the attention modules: q/k/v/o, GPT-2's c_attn/c_proj, NeoX's query_key_value/dense);
the base weights stay frozen and only A and B train. The model keeps its transformers class and module
paths, so gates, the trainer and the dense view work unchanged.
A checkpoint of a LoRA run holds:
- ``model.safetensors``: the merged weights W + (alpha / R) B A, a plain model every spartan command and
  ``from_pretrained`` reads;
- ``adapter/``: the adapter alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``),
  for ``peft.PeftModel.from_pretrained(base, CKPT/adapter)``, and what ``--resume`` continues from (the
  base is loaded again from its source and the adapter put back: no merge is ever undone).
With ``--constraint kl`` or ``--geco-reference batch`` the teacher is the student itself with its adapters
off and every gate open (``DenseView``): the dense base without a second copy of the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from spartan_cli.errors import ConfigError

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what a PeftModel's keys start with: the adapter loads with peft's own loader


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora-rank needs the peft package: pip install 'spartan-cli[lora]' (or pip install "
                          "peft), or drop --lora-rank to train every weight") from None
    return peft


def _projections(module) -> list[tuple[str, torch.nn.Module]]:
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def target_modules(model, targets: list[str] | None = None) -> list[str]:
    """Full module names to adapt: every linear layer inside the attention modules, or, with ``targets``,
    every linear layer of the model whose name ends with one of them (e.g. ["q_proj", "v_proj"])."""
    from spartan_cli.hf.models import adapter_for

    if targets is None:
        names = {id(m): n for n, m in model.named_modules()}
        return [f"{names[id(attn)]}.{n}" for attn in adapter_for(model).attention_modules(model)
                for n, _ in _projections(attn)]
    found = [n for n, _ in _projections(model) if n and any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        some = sorted({n.rsplit(".", 1)[-1] for n, _ in _projections(model) if n})
        raise ConfigError(f"--lora-targets {','.join(targets)!r} matches no linear layer of this model; its layers "
                          f"end in: {', '.join(some)}")
    return found


def add_lora(model, rank: int, alpha: float | None = None, targets: list[str] | None = None, *, seed: int = 0):
    """Inject LoRA adapters of ``rank`` (scale alpha / rank; alpha defaults to rank) into ``model``, in place.
    A is drawn from ``seed`` (B starts at 0: the adapted model is the model), the global RNG left as it was."""
    peft = _peft()
    from transformers.pytorch_utils import Conv1D

    modules = target_modules(model, targets)
    named = dict(model.named_modules())
    conv = any(isinstance(named[n], Conv1D) for n in modules)  # GPT-2 stores weights (in, out)
    cfg = peft.LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=modules,
                          lora_dropout=0.0, bias="none", fan_in_fan_out=conv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.inject_adapter_in_model(cfg, model)


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model) -> bool:
    try:
        return bool(lora_layers(model))
    except ImportError:
        return False


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_state_dict(model) -> dict:
    """The weights with every adapter folded in (W + (alpha / R) B A), under the plain model's names; the
    model itself is not changed (its adapters stay, training can go on)."""
    deltas = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in lora_layers(model):
        with torch.no_grad():
            deltas[f"{names[id(layer)]}.base_layer.weight"] = layer.get_delta_weight("default")
    out = {}
    for key, value in model.state_dict().items():
        if is_adapter_parameter(key):
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value
    return out


def adapter_files(model) -> dict[str, object]:
    """{config dict, weights dict} of the adapter in peft's format (the names peft's loaders expect)."""
    peft = _peft()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config["default"].to_dict().items()}
    weights = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    return {"config": cfg, "weights": weights}


def load_adapter(model, ckpt) -> None:
    """Put the adapter weights saved in ``ckpt``/adapter back into ``model`` (which has the same adapters)."""
    peft = _peft()
    from safetensors.torch import load_file

    from spartan_cli.errors import CheckpointError

    path = Path(ckpt) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing: the checkpoint has no LoRA adapter to resume; restore it "
                              "or start a new run with --overwrite")
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    result = peft.set_peft_model_state_dict(model, weights)
    missing = [k for k in result.unexpected_keys]
    if missing:
        raise CheckpointError(f"{str(path)!r} holds weights this run's adapters do not have ({missing[0]}, ...): "
                              "resume with the run's own --lora-rank and --lora-targets")


@contextmanager
def adapters_off(model):
    """Every LoRA adapter of ``model`` bypassed for the duration: the frozen base weights alone."""
    layers = lora_layers(model)
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class DenseView:
    """The LoRA student seen as its dense base model: adapters off, every gate open, no gradients, the
    student's gate statistics untouched. Called like a model (the trainer's ``reference``)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        from spartan_cli.gating.scopes import dense_view

        with torch.no_grad(), adapters_off(self.model), dense_view(self.model):
            return self.model(**inputs)
