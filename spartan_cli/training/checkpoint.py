"""Checkpoint directories: what a user can read, and what a run needs to resume.

Layout of CKPT/:
  config.json, model.safetensors   the model (HF save_pretrained, gates need no weights of their own)
  tokenizer files                  the tokenizer
  spartan.json                     schema_version, gate/GECO config, base model, target, metrics, versions,
                                   and a manifest (size of every file) checked on load
  run_config.yaml                  the resolved run config
  train_log.jsonl                  one line per logged step (appended by the caller)
  trainer_state.safetensors/.json  optimizer, RNG and multiplier state for --resume
Every file is written to a staging folder first and moved in with os.replace; spartan.json goes last,
so a crash mid-save leaves the previous checkpoint's manifest describing the previous files.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from spartan_cli import __version__
from spartan_cli.errors import CheckpointError

SCHEMA_VERSION = 1
META = "spartan.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
RUN_CONFIG = "run_config.yaml"
TRAIN_LOG = "train_log.jsonl"
TRAJECTORY = "trajectory.png"  # density, CE vs target and beta over steps, drawn from TRAIN_LOG


@contextmanager
def atomic_open(path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on a clean exit it is flushed, fsynced and moved onto
    ``path`` (os.replace), on error removed. The file gets the permissions a plain ``open(path, "w")`` would
    give: an existing file's mode, else 0o666 less the umask (mkstemp alone would leave 0o600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_of_new_file(path))
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def _mode_of_new_file(path: Path) -> int:
    """What ``open(path, "w")`` leaves: the existing file's permission bits, else 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~umask()


def umask() -> int:
    """The process umask (read by setting it and putting it straight back: os offers no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def versions() -> dict:
    import torch
    import transformers

    return {"spartan": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _flatten_optimizer(opt_state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, entry in opt_state.get("state", {}).items():
        for k, v in entry.items():
            key = f"opt.{idx}.{k}"
            if hasattr(v, "shape"):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                scalars[key] = v
    return tensors, {"param_groups": opt_state.get("param_groups", []), "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(out_dir, model, tokenizer, *, meta: dict, run_config_yaml: str | None = None, trainer_state=None,
         state_dict: dict | None = None, adapter: dict | None = None) -> Path:
    """Write a checkpoint into ``out_dir`` atomically (see module docstring) and return its path.
    ``state_dict``: the full weights to write instead of ``model.state_dict()`` (a sharded model's, gathered;
    a LoRA model's, merged). ``adapter``: {"config": dict, "weights": dict} written to adapter/ (training.lora).

    Every byte is written (and fsynced) in the staging folder before anything in ``out_dir`` is replaced, and
    spartan.json is moved in last: a write that fails (disk full) leaves the previous checkpoint as it was,
    and raises CheckpointError. Weights holding NaN or inf are refused before anything is written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    _check_finite(model.state_dict() if state_dict is None else state_dict, out)
    staging = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if run_config_yaml is not None:
            (staging / RUN_CONFIG).write_text(run_config_yaml)
        if adapter is not None:
            from spartan_cli.training.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS

            (staging / ADAPTER_DIR).mkdir()
            save_file(adapter["weights"], str(staging / ADAPTER_DIR / ADAPTER_WEIGHTS))
            (staging / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps(adapter["config"], indent=2, default=str))
        if trainer_state is not None:
            tensors, opt_meta = _flatten_optimizer(trainer_state.optimizer)
            for k, v in trainer_state.rng.items():
                tensors[f"rng.{k}"] = v.cpu()
            save_file(tensors, str(staging / STATE_TENSORS))
            state_json = {
                "step": trainer_state.step, "geco": trainer_state.geco.to_dict(), "tau": trainer_state.tau,
                "base_ce": trainer_state.base_ce, "step0_density": trainer_state.step0_density,
                "tokens_seen": trainer_state.tokens_seen, "elapsed_s": trainer_state.elapsed_s,
                "bad_steps": trainer_state.bad_steps, "optimizer": opt_meta,
                "validation_ref": trainer_state.validation_ref, "eval_base_ce": trainer_state.eval_base_ce,
            }
            (staging / STATE_JSON).write_text(json.dumps(state_json))
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        for name in files:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        manifest = {name: (staging / name).stat().st_size for name in files}
        full_meta = {"schema_version": SCHEMA_VERSION, "spartan_version": __version__, "versions": versions(),
                     **meta, "manifest": manifest}
        with open(staging / META, "w") as f:  # written now, moved in last: it commits the new files
            f.write(json.dumps(full_meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"could not write the checkpoint in {str(out)!r} ({exc.strerror or exc}); nothing there "
                              "was replaced, the previous checkpoint (if any) is intact: free disk space and "
                              "continue with --resume") from None
    try:
        if trainer_state is None:  # a final save: drop a stale resumable state from an earlier interruption
            for name in (STATE_TENSORS, STATE_JSON):
                (out / name).unlink(missing_ok=True)
        mode = 0o666 & ~umask()  # safetensors (save_pretrained's too) writes 0o600: give what open() would
        for name in files:  # renames within one file system: no new space needed
            os.chmod(staging / name, mode)
            (out / name).parent.mkdir(exist_ok=True)
            os.replace(staging / name, out / name)
        os.replace(staging / META, out / META)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_finite(weights: dict, out: Path) -> None:
    """CheckpointError if any floating-point weight holds NaN or inf: such a model is never written."""
    import torch

    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to write {str(out)!r}: weight {name} holds NaN or inf; the previous "
                                  "checkpoint there is untouched: lower --lr or use --dtype float32 and --resume")


def read_meta(ckpt) -> dict:
    """spartan.json of ``ckpt`` after checking the schema and that every file is whole."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is not a directory; pass the --out folder of a sparsify run")
    meta_path = ckpt / META
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no {META}; it is not a spartan checkpoint "
                              f"(or its run never saved): pass the --out folder of a sparsify run")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "restore it or re-run sparsify") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{meta_path} is not text; restore it or re-run sparsify") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} holds a JSON {type(meta).__name__}, not an object; restore it or "
                              "re-run sparsify")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{meta_path} has schema_version {version!r}; this spartan reads {SCHEMA_VERSION}: "
                              f"use the spartan version that wrote it ({meta.get('spartan_version', 'unknown')})")
    for name, size in meta.get("manifest", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {str(path)!r} is missing; restore it or re-run sparsify")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint file {str(path)!r} has {path.stat().st_size} bytes, expected {size} "
                                  "(truncated or edited); restore it or re-run sparsify")
    return meta


def load(ckpt, *, device=None, dtype=None):
    """Load a checkpoint -> (gated model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spartan_cli.gating.attention import attach_gates

    meta = read_meta(ckpt)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except Exception as exc:  # safetensors/transformers raise many kinds on corrupt files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {str(ckpt)!r} could not be loaded ({first}); restore it or re-run sparsify") from None
    attach_gates(model, _gate_config(meta, Path(ckpt)))
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _gate_config(meta: dict, ckpt: Path):
    """The GateConfig recorded in spartan.json, or CheckpointError naming the file."""
    from spartan_cli.config import GateConfig
    from spartan_cli.errors import SpartanError

    if not isinstance(meta.get("gate"), dict):
        raise CheckpointError(f"{ckpt / META} has no gate settings (\"gate\": {{...}}); restore it or re-run sparsify")
    try:
        return GateConfig.from_dict(meta["gate"])
    except (SpartanError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / META}: {exc}; restore it or re-run sparsify") from None


def load_trainer_state(ckpt):
    """The resumable TrainerState saved in ``ckpt``, or CheckpointError naming what is missing."""
    from safetensors.torch import load_file

    from spartan_cli.training.geco import GecoState
    from spartan_cli.training.train import TrainerState

    ckpt = Path(ckpt)
    read_meta(ckpt)
    if not (ckpt / STATE_JSON).is_file() or not (ckpt / STATE_TENSORS).is_file():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has no resumable trainer state (the run finished, or "
                              "never reached a checkpoint); start a new run with --overwrite")
    try:
        tensors = load_file(str(ckpt / STATE_TENSORS))
    except Exception as exc:  # safetensors raises its own error kinds on a corrupt file
        raise CheckpointError(f"{ckpt / STATE_TENSORS} cannot be read ({_first_line(exc)}); restore it, or start "
                              "a new run with --overwrite") from None
    try:
        meta = json.loads((ckpt / STATE_JSON).read_text())
        rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
        return TrainerState(
            step=meta["step"], geco=GecoState.from_dict(meta["geco"]), tau=meta["tau"], base_ce=meta["base_ce"],
            step0_density=meta["step0_density"], optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
            rng=rng, tokens_seen=meta["tokens_seen"], elapsed_s=meta["elapsed_s"], bad_steps=meta["bad_steps"],
            validation_ref=meta.get("validation_ref"), eval_base_ce=meta.get("eval_base_ce"),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not JSON, or fields missing/edited
        raise CheckpointError(f"{ckpt / STATE_JSON} is not a trainer state spartan wrote ({type(exc).__name__}: "
                              f"{_first_line(exc)}); restore it, or start a new run with --overwrite") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
