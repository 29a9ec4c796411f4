"""Resolve a model name to a Hugging Face causal LM + tokenizer, and the per-architecture adapters.

Names: a built-in (``addition``, ``shakespeare``); a local HF directory; a ``.gguf`` file (transformers dequantises it);
or a hub id (``gpt2``, ``EleutherAI/pythia-70m``). Only the adapters know Hugging Face module names.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from spartan_cli.builtin import NAMES
from spartan_cli.errors import ModelError

log = logging.getLogger(__name__)

BUILTIN_MODELS = NAMES


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its decoder blocks and attention modules."""

    model_type: str
    blocks_path: str  # dotted path from the CausalLM to the list of decoder blocks
    attn_attr: str  # attribute of a block holding its attention module
    shape: str  # "gpt2" | "neox" | "llama": the block layout, for circuits

    def blocks(self, model):
        obj = model
        for part in self.blocks_path.split("."):
            obj = getattr(obj, part)
        return list(obj)

    def attention_modules(self, model):
        return [getattr(block, self.attn_attr) for block in self.blocks(model)]

    def attention_param_names(self, model) -> list[str]:
        """Names of the attention parameters (q/k/v/o projections and their biases)."""
        marker = f".{self.attn_attr}."
        return [n for n, _ in model.named_parameters() if marker in n]


ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter("gpt2", "transformer.h", "attn", "gpt2"),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers", "attention", "neox"),
    "llama": Adapter("llama", "model.layers", "self_attn", "llama"),
    "qwen2": Adapter("qwen2", "model.layers", "self_attn", "llama"),
    "mistral": Adapter("mistral", "model.layers", "self_attn", "llama"),
}


def adapter_for(model) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ModelError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    max_positions: int | None


def model_shape(model) -> ModelShape:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = cfg.num_attention_heads
    d_model = cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    return ModelShape(
        n_layers=cfg.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        d_head=d_head,
        max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None),
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_error(name: str) -> ModelError:
    return ModelError(
        f"model {name!r} is not a local path and the model hub is unreachable; "
        f"download it elsewhere and pass the local directory instead (e.g. `spartan sparsify ./{name.split('/')[-1]} ...`)"
    )


def load_model(name: str, *, dtype=None, device=None, trust_remote_code: bool = False):
    """Load ``name`` -> (model, tokenizer, source) with the model in eval mode.

    ``source`` is a string recorded in checkpoints: ``builtin:addition``, an absolute path, or the hub id.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    if name in BUILTIN_MODELS:
        from spartan_cli import builtin

        model, tok = builtin.module(name).load_model(dtype=dtype)
        source = f"builtin:{name}"
    else:
        path = Path(name).expanduser()
        looks_local = path.exists() or name.startswith((".", "/", "~")) or name.endswith(".gguf")
        if looks_local and not path.exists():
            raise ModelError(f"model path {name!r} does not exist; pass an existing HF directory, a .gguf file, "
                             f"a hub id, or one of the built-ins: {', '.join(BUILTIN_MODELS)}")
        kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
        try:
            if path.is_file() and path.suffix == ".gguf":
                model = _load_gguf(path, dtype)
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            elif path.is_dir():
                if not (path / "config.json").is_file():
                    raise ModelError(f"model directory {name!r} has no config.json; pass a directory written by "
                                     f"save_pretrained (or a spartan checkpoint)")
                model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
                tok = AutoTokenizer.from_pretrained(path)
            elif path.is_file():
                raise ModelError(f"model file {name!r} is not a .gguf file; pass a HF directory or a .gguf file")
            else:
                if not _hub_reachable():
                    raise _hub_error(name)
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
                tok = AutoTokenizer.from_pretrained(name)
        except ModelError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "couldn't connect" in str(exc).lower() or "offline" in str(exc).lower():
                raise _hub_error(name) from None
            raise ModelError(f"could not load model {name!r}: {first}") from None
        source = str(path.resolve()) if path.exists() else name
    if device is not None:
        model.to(device)
    model.eval()
    adapter_for(model)  # unsupported architectures fail here, before any work
    return model, tok, source


def _load_gguf(path: Path, dtype):
    """Dequantise a GGUF file and rebuild a plain model (transformers refuses to save GGUF-loaded ones)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    return model
