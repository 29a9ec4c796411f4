"""JSON reports of ``spartan evaluate`` and ``spartan density``: self-describing, written atomically.

A report is one JSON object. Its header keys come first and say what made it:
  schema_version   int, this module's SCHEMA_VERSION (bumped when a metric's meaning or place changes)
  spartan_version  the package version that wrote it
  kind             "evaluate" | "density" | "circuit"
  command          the command line, e.g. "spartan density runs/addition --json"
  config           the resolved configuration (model, data, batch sizes, ...): enough to re-run it
  versions         torch / transformers / python versions
The metrics follow at the top level beside the header (so ``jq .overall.density`` works on a density
report); the metric keys of each kind are documented in measure/evaluate.py, measure/density.py and circuit/discovery.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from spartan_cli import __version__
from spartan_cli.errors import SpartanError

SCHEMA_VERSION = 1
KINDS = ("evaluate", "density", "circuit", "circuit_evaluation")
HEADER = ("schema_version", "spartan_version", "kind", "command", "config", "versions")


class ReportError(SpartanError):
    """A report file is missing, not JSON, or from another schema."""


@dataclass(frozen=True)
class Report:
    kind: str  # one of KINDS
    command: str
    config: dict
    metrics: dict  # JSON-ready; keys must not collide with HEADER
    versions: dict = field(default_factory=dict)
    spartan_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        clash = sorted(set(self.metrics) & set(HEADER))
        assert not clash, f"metric keys {clash} collide with the report header"

    def to_dict(self) -> dict:
        header = {"schema_version": self.schema_version, "spartan_version": self.spartan_version, "kind": self.kind,
                  "command": self.command, "config": self.config, "versions": self.versions}
        return {**header, **self.metrics}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        if not isinstance(d, dict):
            raise ReportError(f"a report is a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(f"report has schema_version {version!r}; this spartan reads {SCHEMA_VERSION}: use the "
                              f"spartan version that wrote it ({d.get('spartan_version', 'unknown')}) or re-run it")
        if d.get("kind") not in KINDS:
            raise ReportError(f"report kind {d.get('kind')!r} is unknown; expected one of {', '.join(KINDS)}")
        metrics = {k: v for k, v in d.items() if k not in HEADER}
        return cls(kind=d["kind"], command=d.get("command", ""), config=d.get("config", {}), metrics=metrics,
                   versions=d.get("versions", {}), spartan_version=d.get("spartan_version", "unknown"),
                   schema_version=version)

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2) + "\n"


def make_report(kind: str, *, command: str, config: dict, metrics: dict) -> Report:
    """A Report stamped with the running versions."""
    from spartan_cli.training.checkpoint import versions

    return Report(kind=kind, command=command, config=config, metrics=metrics, versions=versions())


def write_report(report: Report, out_dir, *, name: str | None = None) -> Path:
    """Write ``report`` to ``out_dir/<kind>.json`` (temp file, then os.replace) and return the path."""
    from spartan_cli.training.checkpoint import atomic_write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {str(out)!r} exists and is not a directory; pass a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name or f"{report.kind}.json")
    atomic_write_text(path, report.to_json())
    return path


def read_report(path) -> Report:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"report {str(path)!r} does not exist; pass the JSON file an evaluate/density --out wrote")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-run the command") from None
    return Report.from_dict(data)


def _finite(obj):
    """JSON has no NaN/inf: write them as null (strict parsers such as jq reject NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
