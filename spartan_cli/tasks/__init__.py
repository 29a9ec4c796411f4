"""Tasks: a behaviour with its own data and metric(s), behind one registry shared by every verb.

A task does two things:
1. ``build(tokenizer)`` turns the task into token ids for that tokenizer (`TaskData`), or raises
   `TaskError` naming what the tokenizer cannot express (a word that is not one token, a missing digit).
2. ``score(model, data)`` runs the model (no grad, eval mode, the model's device) and returns a
   `TaskResult` of named metrics; ``evaluate(model, tokenizer)`` does both.

`spartan evaluate --task T` reports ``evaluate``; circuit discovery (``spartan circuit``) reads the clean
and corrupted prompts of ``build``. Tasks register in ``TASKS`` by name; ``get_task("name")`` looks one up,
and ``get_task("name:argument")`` hands the text after the colon to ``Task.configured`` (for tasks that
take a file, e.g. a future ``custom:FILE.jsonl``). Importing this package imports no torch: task modules
import what they need inside their methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from spartan_cli.errors import TaskError


@dataclass(frozen=True)
class TaskData:
    """A task's examples as token ids for one tokenizer.

    ``clean`` rows are what the model reads; ``corrupted`` rows (same shape) are the minimal-pair
    counterfactuals circuit discovery patches in, or None for tasks that define none yet.
    ``subsets`` names groups of rows a metric is also reported on (e.g. the held-out problems).
    """

    task: str
    clean: Any  # torch.Tensor (batch, pos) int64
    corrupted: Any = None  # torch.Tensor (batch, pos) int64, or None
    subsets: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor (n,) int64 row indices

    def __post_init__(self):
        assert self.clean.dim() == 2, self.clean.shape
        assert self.corrupted is None or self.corrupted.shape == self.clean.shape

    def __len__(self) -> int:
        return self.clean.shape[0]


@dataclass(frozen=True)
class TaskMetric:
    """One number a task reports."""

    name: str  # key in reports, e.g. "accuracy"
    value: float
    examples: int  # how many examples it was computed on
    description: str = ""
    unit: str = ""  # "fraction" (shown as %), "logit", "probability", ...: how the CLI prints it

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "examples": self.examples, "description": self.description,
                "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskMetric":
        return cls(name=d["name"], value=float(d["value"]), examples=int(d["examples"]),
                   description=d.get("description", ""), unit=d.get("unit", ""))


@dataclass(frozen=True)
class TaskResult:
    """The metrics of one task on one model."""

    task: str
    metrics: tuple[TaskMetric, ...]

    def value(self, name: str) -> float:
        return self.metric(name).value

    def metric(self, name: str) -> TaskMetric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.task!r} has no metric {name!r}; it has {[m.name for m in self.metrics]}")

    def to_dict(self) -> dict:
        """{"task": name, "metrics": {metric: {"value", "examples", "description", "unit"}}} (jq: .metrics.accuracy.value)."""
        return {"task": self.task,
                "metrics": {m.name: {k: v for k, v in m.to_dict().items() if k != "name"} for m in self.metrics}}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskResult":
        return cls(task=d["task"], metrics=tuple(TaskMetric.from_dict({"name": k, **v}) for k, v in d["metrics"].items()))


class Task:
    """Interface of a task; subclasses set ``name`` and ``summary`` and implement ``build`` and ``score``."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    native_model: ClassVar[str | None] = None  # built-in model whose own task this is (default for it)

    def build(self, tokenizer, *, seed: int = 0) -> TaskData:
        """The task's examples for ``tokenizer``; TaskError if the tokenizer cannot express them."""
        raise NotImplementedError

    def score(self, model, data: TaskData, *, batch_size: int = 256) -> TaskResult:
        """The task's metrics of ``model`` on ``data`` (no grad, eval mode, restored after)."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, *, batch_size: int = 256, seed: int = 0) -> TaskResult:
        return self.score(model, self.build(tokenizer, seed=seed), batch_size=batch_size)

    def configured(self, argument: str) -> "Task":
        """This task set up by the text after ``name:`` (e.g. a file); most tasks take none."""
        raise TaskError(f"task {self.name!r} takes no argument, got {self.name}:{argument}; pass --task {self.name}")


def _registry() -> dict[str, Task]:
    from spartan_cli.tasks.addition import AdditionTask

    return {t.name: t for t in (AdditionTask(),)}


TASKS: dict[str, Task] = _registry()


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(spec: str) -> Task:
    """The task named ``spec`` (``name`` or ``name:argument``); TaskError listing the valid names."""
    name, sep, argument = str(spec).partition(":")
    try:
        task = TASKS[name]
    except KeyError:
        raise TaskError(f"task {spec!r} is unknown; choose one of {', '.join(task_names())}") from None
    return task.configured(argument) if sep else task


def default_task(model_name: str | None) -> Task | None:
    """The task a built-in model was made for (``addition`` -> the addition task), else None."""
    for task in TASKS.values():
        if model_name is not None and task.native_model == model_name:
            return task
    return None
