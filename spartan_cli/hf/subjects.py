"""The model a verb works on, and the base model it is compared with: a spartan checkpoint (gated, gates
deterministic) or anything ``models.load_model`` takes (dense), with the task it is measured on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spartan_cli.errors import CheckpointError, ModelError
from spartan_cli.progress import Progress


@dataclass(frozen=True)
class Subject:
    """A model to evaluate, as loaded."""

    model: Any  # transformers PreTrainedModel, eval mode
    tokenizer: Any
    name: str  # as the user gave it
    source: str  # checkpoint path, builtin:NAME, absolute model path or hub id
    meta: dict | None  # spartan.json of a checkpoint, None for a plain model

    @property
    def gated(self) -> bool:
        return self.meta is not None

    @property
    def builtin(self) -> str | None:
        """The built-in model this is (or was post-trained from), e.g. "addition"; else None."""
        source = self.meta.get("base_model", "") if self.meta else self.source
        return source.split(":", 1)[1] if str(source).startswith("builtin:") else None


def load_subject(name: str, *, device=None, trust_remote_code: bool = False) -> Subject:
    """Load ``name``: a spartan checkpoint (gated) or anything ``models.load_model`` accepts (dense)."""
    from spartan_cli.training import checkpoint
    from spartan_cli.hf.models import load_model

    path = Path(name).expanduser()
    if path.is_dir() and _is_checkpoint(path):
        meta = checkpoint.read_meta(path)  # schema and manifest first: one clear line for a broken folder
        model, tokenizer = checkpoint.load(path, device=device)
        return Subject(model=model, tokenizer=tokenizer, name=name, source=str(path.resolve()), meta=meta)
    model, tokenizer, source = load_model(name, device=device, trust_remote_code=trust_remote_code)
    return Subject(model=model, tokenizer=tokenizer, name=name, source=source, meta=None)


def swap_for_base(subject: Subject, base_name: str, *, device, trust_remote_code: bool, say):
    """(subject without its model, the base model): the subject's model is freed first, so only one model
    is in memory at a time; the base must tokenise like the subject (``load_base``)."""
    import gc
    from dataclasses import replace

    subject = replace(subject, model=None)
    gc.collect()
    say(Progress(f"loading base model {base_name}", 0, None))
    base, _ = load_base(base_name, subject, device=device, trust_remote_code=trust_remote_code)
    return subject, base


def load_subject_and_task(cfg, say: Callable[[Progress], None]):
    """(subject, task, device) for a verb's config (``model``, ``task``, ``device``, ``trust_remote_code``):
    the task is ``cfg.task``, else the built-in model's own (None if it has none). An unknown task name
    fails before any loading."""
    from spartan_cli.tasks import default_task, get_task
    from spartan_cli.training.train import resolve_device

    task = get_task(cfg.task) if cfg.task is not None else None
    device = resolve_device(cfg.device)
    say(Progress(f"loading {cfg.model}", 0, None))
    subject = load_subject(cfg.model, device=device, trust_remote_code=cfg.trust_remote_code)
    return subject, task or default_task(subject.builtin), device


def _is_checkpoint(path: Path) -> bool:
    """A spartan.json, or a config.json that says it was gated (a checkpoint that lost its spartan.json)."""
    if (path / "spartan.json").exists():
        return True
    config = path / "config.json"
    if config.is_file():
        try:
            return "spartan_gate" in json.loads(config.read_text())
        except json.JSONDecodeError:
            return False
    return False


def base_model_name(subject: Subject, baseline: str | None = None) -> str | None:
    """The model to compare with: ``baseline``, else the checkpoint's base model, else None (plain model)."""
    if baseline is not None:
        return baseline
    if subject.meta is None:
        return None
    source = subject.meta.get("base_model") or subject.meta.get("base_model_name")
    if not source:
        raise CheckpointError(f"checkpoint {subject.name!r} does not name its base model in spartan.json; "
                              "pass --baseline MODEL (or --no-baseline)")
    return source.split(":", 1)[1] if source.startswith("builtin:") else source


def load_base(name: str, subject: Subject, *, device=None, trust_remote_code: bool = False):
    """Load the base model -> (model, tokenizer); ModelError with the fix if it is gone or tokenises differently."""
    from spartan_cli.hf.models import load_model

    try:
        model, tokenizer, _ = load_model(name, device=device, trust_remote_code=trust_remote_code)
    except ModelError as exc:
        raise ModelError(f"base model {name!r} could not be loaded ({exc}); pass --baseline MODEL to compare with "
                         "another copy of it, or --no-baseline") from None
    if _vocab(tokenizer) != _vocab(subject.tokenizer):
        raise ModelError(f"base model {name!r} tokenises differently from {subject.name!r}, so their CE is not "
                         "comparable; pass --baseline with the model the checkpoint was trained from")
    return model, tokenizer


def _vocab(tokenizer) -> dict | None:
    return tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
