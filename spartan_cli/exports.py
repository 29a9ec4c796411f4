"""Export a checkpoint or a circuit for other tools: ``export(ExportConfig) -> ExportResult``.

Formats live in ``FORMATS`` (name -> Format); each reads one kind of source and writes one artifact:
- ``hf``: a Hugging Face directory whose config.json says ``"attn_implementation": "spartan"`` and carries
  ``spartan_gate`` (gate kind and bias). Any transformers user loads it with
  ``AutoModelForCausalLM.from_pretrained`` after ``import spartan_cli`` (which registers the gated
  attention, see ``registration``); its gates are deterministic, 1[g > 0], in eval and training mode.
  No remote code. A spartan.json (with a fresh manifest) makes it a spartan checkpoint as well.
- ``dense-hf``: the post-trained weights without gates: a plain HF directory (transformers' default
  attention). It loses the sparsity: every query reads every earlier key again.
- ``masks``: JSONL, one record per sequence (a dataset's blocks or ``--prompt`` texts): its tokens and,
  per layer and head, the open (query, key) pairs of the deterministic gates.
- ``graphml``, ``dot``, ``json`` (networkx node-link), ``png``, ``svg``: the circuit of a ``circuit.json``
  (``spartan circuit --out``), through the writers of ``circuit.run``; png/svg render the DOT with
  graphviz's ``dot`` program.
Every file is written to a temporary name and moved in place; directories are staged beside ``out``.

masks record (``MASKS_SCHEMA_VERSION``)::

    schema_version, kind ("attention_masks"), sequence (index), source, text (prompts only)
    token_ids [pos], tokens [pos]              decoded one token at a time
    n_layers, n_heads, density                 open / causal pairs of this sequence, all heads
    open       open[layer][head] = [[query, key], ...]  positions, key <= query, sorted
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from spartan_cli.errors import ConfigError, DataError

MASKS_SCHEMA_VERSION = 1
EXPORT_NOTE = "export.json"


@dataclass(frozen=True)
class ExportConfig:
    """Settings of ``spartan export``."""

    source: str  # checkpoint directory (hf, dense-hf, masks) or circuit.json / its folder (graph formats)
    format: str  # a key of FORMATS
    out: str  # directory (hf, dense-hf) or file (every other format)
    prompts: tuple[str, ...] = ()  # masks: these texts instead of a dataset
    data: str | None = None  # masks: text to cut into blocks; None: the checkpoint's held-out blocks
    seq_len: int | None = None  # masks with --data: tokens per block
    text_field: str = "text"
    max_sequences: int | None = None  # masks: at most this many sequences
    batch_size: int = 8  # masks: sequences per forward
    device: str = "auto"
    overwrite: bool = False  # replace an existing out

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"export format {self.format!r} is unknown; choose one of {', '.join(sorted(FORMATS))}")
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.prompts and self.data is not None:
            raise ConfigError("--prompt and --data both given; pass one of them")
        if any(not p for p in self.prompts):
            raise ConfigError("--prompt is empty; pass some text")
        for name in ("batch_size", "max_sequences", "seq_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts)}

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        from spartan_cli.config import strict_from_dict

        d = dict(d)
        if "prompt" in d:  # the CLI's spelling
            p = d.pop("prompt")
            d["prompts"] = (p,) if isinstance(p, str) else tuple(p or ())
        return strict_from_dict(cls, d, where="export")


@dataclass(frozen=True)
class ExportResult:
    format: str
    out: Path
    files: tuple[Path, ...]  # what was written (inside ``out`` for directory formats)
    details: dict = field(default_factory=dict)  # per format: sequences and open pairs, edges, ...

    def to_dict(self) -> dict:
        return {"format": self.format, "out": str(self.out), "files": [str(f) for f in self.files], **self.details}


@dataclass(frozen=True)
class Format:
    name: str
    source: str  # "checkpoint" | "circuit"
    help: str
    write: Callable[..., ExportResult]  # (cfg, say=None): say takes progress.Progress records


# ------------------------------------------------------------------------------------------ helpers
def _check_out(out: Path, *, overwrite: bool, directory: bool) -> None:
    if out.exists() and not overwrite:
        if directory and out.is_dir() and not any(out.iterdir()):
            return
        raise ConfigError(f"--out {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and out.is_dir() != directory:
        raise ConfigError(f"--out {str(out)!r} exists and is {'not ' if directory else ''}a directory; "
                          "choose another --out")


def _publish_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``; an old ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_file(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    from spartan_cli.training.checkpoint import atomic_open

    with atomic_open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def _checkpoint_dir(source: str) -> Path:
    from spartan_cli.training import checkpoint

    path = Path(source).expanduser()
    checkpoint.read_meta(path)  # a clear line for a missing/broken checkpoint before any loading
    return path


# -------------------------------------------------------------------------------------- HF formats
def _save_hf(cfg: ExportConfig, *, gated: bool) -> ExportResult:
    import torch

    from spartan_cli.training import checkpoint
    from spartan_cli.gating.attention import ATTN_IMPLEMENTATION

    src = _checkpoint_dir(cfg.source)
    out = Path(cfg.out).expanduser()
    _check_out(out, overwrite=cfg.overwrite, directory=True)
    meta = checkpoint.read_meta(src)
    model, tokenizer = checkpoint.load(src, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    os.chmod(staging, 0o777 & ~checkpoint.umask())  # mkdtemp makes 0o700; the published directory is a plain one
    try:
        if not gated:
            del model.config.spartan_gate  # a plain model: transformers picks its own attention
            model.config._attn_implementation = None
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        if gated:  # save_pretrained drops the attention choice; the loader needs it to build gated attention
            config["attn_implementation"] = ATTN_IMPLEMENTATION
            assert config.get("spartan_gate") == meta["gate"], (config.get("spartan_gate"), meta["gate"])
        else:
            config.pop("spartan_gate", None)
            config.pop("attn_implementation", None)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        note = {"schema_version": checkpoint.SCHEMA_VERSION, "kind": f"export:{cfg.format}",
                "source": str(src.resolve()), "base_model": meta.get("base_model"), "gate": meta.get("gate"),
                "gates_active": gated}
        (staging / EXPORT_NOTE).write_text(json.dumps(note, indent=2) + "\n")
        if gated:  # also a spartan checkpoint (evaluate/density/circuit read it), without a trainer state
            files = sorted(p.name for p in staging.iterdir() if p.is_file())
            manifest = {name: (staging / name).stat().st_size for name in files}
            kept = {k: v for k, v in meta.items() if k not in ("manifest", "schema_version", "spartan_version")}
            full = {"schema_version": checkpoint.SCHEMA_VERSION, "spartan_version": meta.get("spartan_version"),
                    **kept, "exported_from": str(src.resolve()), "manifest": manifest}
            (staging / checkpoint.META).write_text(json.dumps(full, indent=2) + "\n")
        _publish_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = tuple(sorted(out / p.name for p in out.iterdir() if p.is_file()))
    return ExportResult(cfg.format, out, files, {"gates_active": gated, "base_model": meta.get("base_model")})


def write_hf(cfg: ExportConfig, say=None) -> ExportResult:
    return _save_hf(cfg, gated=True)


def write_dense_hf(cfg: ExportConfig, say=None) -> ExportResult:
    return _save_hf(cfg, gated=False)


# -------------------------------------------------------------------------------------------- masks
def mask_records(model, tokenizer, blocks, *, batch_size: int = 8, texts=None, source: str = ""):
    """Yield one masks record (module docstring) per row of ``blocks`` (batch, pos) token ids, in order.

    Gates are deterministic (eval mode); pairs a query may not see are never open."""
    import torch

    from spartan_cli.gating.attention import gate_states
    from spartan_cli.gating.scopes import evaluating, keeping_gate_logits

    device = next(model.parameters()).device
    n_layers, n_heads = len(gate_states(model)), gate_states(model)[0].n_heads
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size]  # (batch, pos)
        with torch.no_grad(), evaluating(model), keeping_gate_logits(model) as states:
            model(input_ids=ids.to(device))
            open_ = torch.stack([s.gate_logits > 0 for s in states], dim=1).cpu()  # (batch, n_layers, n_heads, q, k)
        pos = ids.shape[1]
        for row in range(ids.shape[0]):
            index = start + row
            nz = open_[row].nonzero().tolist()  # [[layer, head, query, key], ...] sorted
            pairs: list[list[list]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
            for layer, head, q, k in nz:
                pairs[layer][head].append([q, k])
            token_ids = ids[row].tolist()
            record = {"schema_version": MASKS_SCHEMA_VERSION, "kind": "attention_masks", "sequence": index,
                      "source": source}
            if texts is not None:
                record["text"] = texts[index]
            record.update({"token_ids": token_ids, "tokens": [tokenizer.decode([t]) for t in token_ids],
                           "n_layers": n_layers, "n_heads": n_heads,
                           "density": len(nz) / (n_layers * n_heads * pos * (pos + 1) / 2), "open": pairs})
            yield record


def write_masks(cfg: ExportConfig, say=None) -> ExportResult:
    from spartan_cli.measure.density import encode_prompt
    from spartan_cli.hf.subjects import load_subject
    from spartan_cli.measure.evaluate import eval_data
    from spartan_cli.training.train import resolve_device

    src = _checkpoint_dir(cfg.source)
    out = Path(cfg.out).expanduser()
    _check_out(out, overwrite=cfg.overwrite, directory=False)
    subject = load_subject(str(src), device=resolve_device(cfg.device))
    if cfg.prompts:
        prompts = cfg.prompts[:cfg.max_sequences]
        # prompts differ in length: one forward each, ids (1, pos)
        rows = [(encode_prompt(subject.tokenizer, p)[None], [p]) for p in prompts]
        source = "prompt"
    else:
        data = eval_data(subject, data=cfg.data, seq_len=cfg.seq_len, text_field=cfg.text_field)
        if data is None:
            raise ConfigError(f"{cfg.source!r} stores no data config; pass --data FILE or --prompt TEXT")
        blocks = data.blocks.input_ids  # (batch, pos)
        if cfg.max_sequences is not None:
            blocks = blocks[:cfg.max_sequences]
        rows = [(blocks, None)]
        source = data.source
    out.parent.mkdir(parents=True, exist_ok=True)
    from spartan_cli.training.checkpoint import atomic_open

    from spartan_cli.progress import Progress

    say = say or (lambda p: None)
    total = sum(ids.shape[0] for ids, _ in rows)
    n, pairs = 0, 0
    say(Progress("open gates per sequence", 0, total))
    with atomic_open(out, "w") as f:
        for ids, texts in rows:
            for record in mask_records(subject.model, subject.tokenizer, ids, batch_size=cfg.batch_size,
                                       texts=texts, source=source):
                record["sequence"] = n
                f.write(json.dumps(record) + "\n")
                n += 1
                pairs += sum(len(h) for layer in record["open"] for h in layer)
                say(Progress("open gates per sequence", n, total))
    return ExportResult(cfg.format, out, (out,), {"sequences": n, "open_pairs": pairs})


# ------------------------------------------------------------------------------------ circuit graphs
def read_circuit_source(source: str):
    """circuit.json (or the folder ``spartan circuit --out`` wrote) -> discovery.CircuitResult."""
    from spartan_cli.circuit.run import read_circuit

    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "circuit.json"
    return read_circuit(path)


def _graph_title(result) -> str:
    kind = "sparse" if result.gated else "dense"
    return f"{kind} {result.name}: {result.graph.meta.get('task')} circuit"


def _graph_export(cfg: ExportConfig, render: Callable) -> ExportResult:
    out = Path(cfg.out).expanduser()
    _check_out(out, overwrite=cfg.overwrite, directory=False)
    result = read_circuit_source(cfg.source)
    _write_file(out, render(result))
    return ExportResult(cfg.format, out, (out,), {"edges": result.graph.n_edges, "nodes": result.graph.n_nodes})


def node_link_text(graph) -> str:
    """The circuit as networkx node-link JSON (``networkx.node_link_graph(data, edges="edges")`` reads it)."""
    import networkx as nx

    from spartan_cli.circuit.run import circuit_networkx

    return json.dumps(nx.node_link_data(circuit_networkx(graph), edges="edges")) + "\n"


def render_dot(dot: str, fmt: str) -> bytes:
    """Render DOT text to ``fmt`` (png, svg) with graphviz's ``dot`` program."""
    exe = shutil.which("dot")
    if exe is None:
        raise DataError(f"--format {fmt} needs the `dot` program of Graphviz, which is not installed: install the "
                        "graphviz package (apt install graphviz, brew install graphviz or conda install graphviz), "
                        "or export --format dot and render it elsewhere")
    done = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise DataError(f"graphviz `dot -T{fmt}` failed: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout


def write_graphml(cfg, say=None):
    from spartan_cli.circuit.run import circuit_graphml_text

    return _graph_export(cfg, lambda r: circuit_graphml_text(r.graph))


def write_dot(cfg, say=None):
    from spartan_cli.circuit.run import circuit_dot_text

    return _graph_export(cfg, lambda r: circuit_dot_text(r.graph, title=_graph_title(r)))


def write_node_link(cfg, say=None):
    return _graph_export(cfg, lambda r: node_link_text(r.graph))


def eap_ig_text(result) -> str:
    """A component circuit as EAP-IG / MIB graph JSON (``eap.graph.Graph.from_json`` loads it; so does
    ``spartan circuit --evaluate-circuit``)."""
    from spartan_cli.circuit.graph import Graph

    if not isinstance(result.graph, Graph):
        raise DataError("--format eap-ig writes component circuits; this circuit.json is token level (EAP-IG "
                        "graphs have no positions): export --format json or graphml instead")
    return json.dumps(result.graph.to_eap_ig()) + "\n"


def write_eap_ig(cfg, say=None):
    return _graph_export(cfg, eap_ig_text)


def _rendered(fmt: str):
    def write(cfg, say=None):
        from spartan_cli.circuit.run import circuit_dot_text

        if shutil.which("dot") is None:  # fail before reading anything
            render_dot("", fmt)
        return _graph_export(cfg, lambda r: render_dot(circuit_dot_text(r.graph, title=_graph_title(r)), fmt))

    return write


FORMATS: dict[str, Format] = {f.name: f for f in [
    Format("hf", "checkpoint", "HF directory with gates active (deterministic); load with "
           "AutoModelForCausalLM.from_pretrained after `import spartan_cli`", write_hf),
    Format("dense-hf", "checkpoint", "plain HF directory of the post-trained weights WITHOUT gates "
           "(loses the sparsity)", write_dense_hf),
    Format("masks", "checkpoint", "JSONL: per sequence, its tokens and the open (query, key) pairs per layer "
           "and head (--data or --prompt)", write_masks),
    Format("graphml", "circuit", "the circuit of a circuit.json as GraphML (networkx, Gephi, yEd)", write_graphml),
    Format("dot", "circuit", "the circuit as Graphviz DOT", write_dot),
    Format("json", "circuit", "the circuit as networkx node-link JSON", write_node_link),
    Format("eap-ig", "circuit", "the circuit as EAP-IG / MIB graph JSON (cfg, nodes, edges with score and "
           "in_graph)", write_eap_ig),
    Format("png", "circuit", "the circuit drawn by Graphviz (needs the graphviz package)", _rendered("png")),
    Format("svg", "circuit", "the circuit drawn by Graphviz (needs the graphviz package)", _rendered("svg")),
]}


def export(cfg: ExportConfig, *, on_progress: Callable | None = None) -> ExportResult:
    """Write ``cfg.source`` in ``cfg.format`` to ``cfg.out`` (see the module docstring); ``on_progress``
    takes progress.Progress records of the long formats (masks)."""
    return FORMATS[cfg.format].write(cfg, say=on_progress)
