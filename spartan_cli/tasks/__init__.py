"""Tasks: a behaviour with its own data and metric(s), behind one registry shared by every verb.

A task does three things:
1. ``contrast(tokenizer, n=, seed=)`` builds minimal pairs for circuit discovery: a `ContrastBatch` of
   clean and corrupted prompts of equal token length (right-padded, ``attention_mask``) and ``answers``,
   the token ids its metric reads; or raises `TaskError` naming what the tokenizer cannot express (a
   word that is not one token, a year it splits into digits).
2. ``metric(logits, batch)`` scores one run of such a batch: the batch mean of a per-prompt number read
   at the last real position of each row (``attention_mask.sum(1) - 1``), higher = more like the clean
   run; ``metric_name`` says which ("logit_diff", "prob_diff").
3. ``build(tokenizer)`` + ``score(model, data)`` (= ``evaluate(model, tokenizer)``) give the
   `TaskResult` that ``spartan evaluate --task T`` reports.

Prompts are tokenised without special tokens: no BOS is prepended (``describe()["bos"]`` records it,
so a circuit report can embed the convention). Tasks register in ``TASKS`` by name; ``get_task("name")``
looks one up, and ``get_task("name:argument")`` hands the text after the colon to ``Task.configured``
(``ioi:abc`` picks a corruption, ``custom:FILE.jsonl`` a file). Importing this package imports no
torch: task modules import what they need inside their functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from spartan_cli.errors import TaskError


@dataclass(frozen=True)
class TaskData:
    """A task's examples as token ids for one tokenizer.

    ``clean`` rows are what the model reads; ``corrupted`` rows (same shape) are the minimal-pair
    counterfactuals circuit discovery patches in, or None for tasks that define none.
    ``answers`` and ``attention_mask`` are those of the task's `ContrastBatch` (None for tasks scored
    on whole sequences, like addition's exact match).
    ``subsets`` names groups of rows a metric is also reported on (e.g. the held-out problems).
    """

    task: str
    clean: Any  # torch.Tensor (batch, pos) int64
    corrupted: Any = None  # torch.Tensor (batch, pos) int64, or None
    subsets: dict[str, Any] = field(default_factory=dict)  # name -> torch.Tensor (n,) int64 row indices
    answers: Any = None  # torch.Tensor (batch, k) int64: what the metric reads, or None
    attention_mask: Any = None  # torch.Tensor (batch, pos), 1 = real token (right padding), or None

    def __post_init__(self):
        assert self.clean.dim() == 2, self.clean.shape
        assert self.corrupted is None or self.corrupted.shape == self.clean.shape
        assert self.attention_mask is None or self.attention_mask.shape == self.clean.shape

    def __len__(self) -> int:
        return self.clean.shape[0]

    def contrast(self):
        """These rows as a `ContrastBatch` (needs ``corrupted``)."""
        from spartan_cli.circuit.contrast import ContrastBatch

        if self.corrupted is None:
            raise TaskError(f"task {self.task!r} built no corrupted prompts; it cannot be used for circuits")
        return ContrastBatch(self.clean, self.corrupted, self.answers, self.attention_mask)


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


@dataclass(frozen=True)
class RowMetric:
    """A per-prompt number a contrast task reports in ``evaluate`` (averaged over prompts)."""

    name: str
    description: str
    unit: str  # "logit", "probability", "fraction"


class Task:
    """Interface of a task; subclasses set ``name``, ``summary``, ``metric_name`` and ``default_n`` and
    implement ``contrast`` and ``row_scores`` (contrast tasks), or ``build`` and ``score`` (addition's
    exact match keeps its own)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help
    native_model: ClassVar[str | None] = None  # built-in model whose own task this is (default for it)
    metric_name: ClassVar[str] = ""  # what ``metric`` computes: "logit_diff", "prob_diff"
    metric_description: ClassVar[str] = ""
    default_n: ClassVar[int | None] = None  # prompts ``contrast`` builds when n is None (None: all there are)
    row_metrics: ClassVar[tuple[RowMetric, ...]] = ()  # what ``score`` reports, the first is ``metric_name``
    fixed_layout: ClassVar[bool] = False  # position p plays one role in every prompt (token-level circuits need it)

    # --------------------------------------------------------------------------------- identity
    @property
    def spec(self) -> str:
        """The ``--task`` text that gives this task back (``ioi:abc``, ``custom:rows.jsonl``)."""
        return self.name

    def describe(self) -> dict:
        """The task's conventions, for reports: name, metric, corruption, BOS, default n."""
        return {"task": self.name, "spec": self.spec, "metric": self.metric_name,
                "metric_description": self.metric_description, "bos": False, "default_n": self.default_n}

    def configured(self, argument: str) -> "Task":
        """This task set up by the text after ``name:`` (e.g. a file); most tasks take none."""
        raise TaskError(f"task {self.name!r} takes no argument, got {self.name}:{argument}; pass --task {self.name}")

    # --------------------------------------------------------------------------------- circuits
    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        """``n`` (default ``default_n``) minimal pairs for ``tokenizer`` -> ContrastBatch, right-padded.

        ``clean``/``corrupted`` (batch, pos) int64 of one shape, ``attention_mask`` (batch, pos),
        ``answers`` (batch, k) int64, what ``metric`` reads. Same ``seed`` -> same pairs.
        TaskError if the tokenizer cannot express the task.
        """
        raise TaskError(f"task {self.name!r} defines no clean/corrupted pairs; choose one of "
                        f"{', '.join(n for n in task_names() if TASKS[n].metric_name)}")

    def metric(self, logits, batch):
        """Batch mean of ``row_scores`` at each row's last real position -> scalar tensor (differentiable).

        ``logits``: (batch, pos, vocab); ``batch``: a ContrastBatch of this task (its ``answers``).
        """
        return self.row_scores(final_logits(logits, batch), batch.answers).mean()

    def row_scores(self, last, answers):
        """The metric per prompt: ``last`` (batch, vocab) logits at the answer position -> (batch,)."""
        raise NotImplementedError

    def row_values(self, last, answers) -> dict:
        """Every ``row_metrics`` entry per prompt: name -> (batch,) tensor. Default: the metric only."""
        return {self.row_metrics[0].name: self.row_scores(last, answers)}

    # --------------------------------------------------------------------------------- evaluate
    def build(self, tokenizer, *, seed: int = 0) -> TaskData:
        """The task's examples for ``tokenizer``; TaskError if the tokenizer cannot express them."""
        batch = self.contrast(tokenizer, seed=seed)
        return TaskData(task=self.name, clean=batch.clean, corrupted=batch.corrupted, answers=batch.answers,
                        attention_mask=batch.attention_mask)

    def score(self, model, data: TaskData, *, batch_size: int = 32) -> TaskResult:
        """The task's metrics of ``model`` on ``data`` (no grad, eval mode, restored after): each of
        ``row_metrics`` averaged over the clean prompts."""
        import torch

        if not self.row_metrics:
            raise NotImplementedError(f"task {self.name!r} implements no score")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {m.name: 0.0 for m in self.row_metrics}
        rows = data.contrast()
        try:
            with torch.no_grad():
                for start in range(0, len(data), batch_size):
                    batch = rows.slice(start, start + batch_size)
                    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
                    logits = model(input_ids=batch.clean.to(device), attention_mask=mask).logits  # (batch, pos, vocab)
                    last = final_logits(logits.float(), batch)  # (batch, vocab)
                    for name, values in self.row_values(last, batch.answers.to(device)).items():
                        sums[name] += float(values.sum())
        finally:
            model.train(was_training)
        metrics = tuple(TaskMetric(m.name, sums[m.name] / len(data), len(data), m.description, unit=m.unit)
                        for m in self.row_metrics)
        return TaskResult(task=self.name, metrics=metrics)

    def evaluate(self, model, tokenizer, *, batch_size: int = 32, seed: int = 0) -> TaskResult:
        return self.score(model, self.build(tokenizer, seed=seed), batch_size=batch_size)


# ------------------------------------------------------------------------------------- shared pieces
def final_logits(logits, batch):
    """Logits at each row's last real position: (batch, pos, vocab) -> (batch, vocab).

    The last real position is ``attention_mask.sum(1) - 1`` (right padding), or the last position when
    the batch has no mask. Logits of only the last k positions (``logits_to_keep``) are read from the end.
    """
    import torch

    rows, pos = batch.clean.shape
    if batch.attention_mask is None:
        index = torch.full((rows,), pos - 1, dtype=torch.long, device=logits.device)
    else:
        index = batch.attention_mask.to(logits.device).long().sum(1) - 1  # (batch,)
    index = index - (pos - logits.shape[1])  # logits may cover the last positions only
    assert int(index.min()) >= 0, "logits do not reach every row's last real token"
    return logits[torch.arange(rows, device=logits.device), index]  # (batch, vocab)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (no BOS, whatever the tokenizer's default).

    TaskError when the tokenizer cannot encode the text at all (e.g. the built-in addition model's
    character vocabulary has no unknown token, so an IOI name makes the Rust tokenizer raise a bare
    ``Exception``): the task does not fit this model's tokenizer."""
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except Exception as err:  # tokenizers raises a bare Exception; anything here means "cannot encode"
        raise TaskError(f"the model's tokenizer ({_tokenizer_name(tokenizer)}) cannot encode the task's text "
                        f"{text!r}: {_one_line(err)}; the task does not fit this model's vocabulary: pick a task "
                        f"made for this model, or a model whose tokenizer covers the task") from err


def _tokenizer_name(tokenizer) -> str:
    """``'gpt2', 50,257 tokens`` (the tokenizer's own name where it has one), for error messages."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    try:
        return f"{name}, {len(tokenizer):,} tokens"
    except TypeError:
        return str(name)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token, else None."""
    ids = encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def show_tokens(tokenizer, text: str) -> str:
    """``'text' -> ['pie', 'ces']``, for error messages."""
    ids = encode(tokenizer, text)
    try:
        pieces = [tokenizer.decode([i]) for i in ids]
    except (TypeError, ValueError, KeyError):
        pieces = ids
    return f"{text!r} -> {pieces}"


def pad_id(tokenizer) -> int:
    """The id right padding uses (masked out, never read): pad, else eos, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def contrast_batch(clean: Sequence[Sequence[int]], corrupted: Sequence[Sequence[int]], answers, *, pad: int):
    """Right-pad token rows into a ContrastBatch; row i of clean and corrupted must have one length."""
    import torch

    from spartan_cli.circuit.contrast import ContrastBatch

    if not clean:
        raise TaskError("no prompts to build: the task produced 0 pairs; ask for n >= 1")
    assert len(clean) == len(corrupted) == len(answers)
    pos = max(len(row) for row in clean)
    ids = torch.full((2, len(clean), pos), pad, dtype=torch.long)  # (clean/corrupted, batch, pos)
    mask = torch.zeros(len(clean), pos, dtype=torch.long)  # (batch, pos)
    for i, (a, b) in enumerate(zip(clean, corrupted)):
        assert len(a) == len(b), (i, len(a), len(b))
        ids[0, i, :len(a)] = torch.tensor(a, dtype=torch.long)
        ids[1, i, :len(b)] = torch.tensor(b, dtype=torch.long)
        mask[i, :len(a)] = 1
    return ContrastBatch(ids[0], ids[1], torch.as_tensor(answers, dtype=torch.long), mask)


def logit_difference(last, answers):
    """Per row: mean logit of the right answers - mean logit of the wrong ones -> (batch,).

    ``answers`` (batch, 2k): columns [0, k) right, [k, 2k) wrong, -1 = unused slot; for k = 1 this is
    [right, wrong], the EAP-IG ``[correct_idx, incorrect_idx]`` layout.
    """
    right, wrong = answer_logits(last, answers)
    return _masked_mean(*right) - _masked_mean(*wrong)


def answer_logits(last, answers):
    """((right logits, right mask), (wrong logits, wrong mask)), each (batch, k), from ``answers`` (batch, 2k)."""
    k = answers.shape[1] // 2
    used = answers >= 0  # (batch, 2k)
    picked = last.gather(1, answers.clamp(min=0).to(last.device))  # (batch, 2k)
    used = used.to(last.device)
    return (picked[:, :k], used[:, :k]), (picked[:, k:], used[:, k:])


def _masked_mean(values, used):
    return (values * used).sum(1) / used.sum(1).clamp(min=1)


def best_is_right(last, answers):
    """Per row, 1.0 if the highest-logit candidate answer is a right one, else 0.0 -> (batch,)."""
    import torch

    (right, right_used), (wrong, wrong_used) = answer_logits(last, answers)
    lowest = torch.finfo(last.dtype).min
    best_right = right.masked_fill(~right_used, lowest).amax(1)
    best_wrong = wrong.masked_fill(~wrong_used, lowest).amax(1)
    return (best_right > best_wrong).to(last.dtype)


LOGIT_DIFF = RowMetric("logit_diff", "logit of the right answer - logit of the wrong one, last real position",
                       "logit")
ACCURACY = RowMetric("accuracy", "the right answer's logit beats the wrong one's", "fraction")


# ------------------------------------------------------------------------------------- registry
class CorruptionChoice:
    """A task whose corruption ``name:CORRUPTION`` picks (``ioi:abc``, ``addition:operands``); mixed into
    a Task that sets ``corruptions`` (name -> description) and ``default_corruption``."""

    name: ClassVar[str]
    corruptions: ClassVar[dict[str, str]]
    default_corruption: ClassVar[str]

    def __init__(self, corruption: str | None = None):
        corruption = self.default_corruption if corruption is None else corruption
        if corruption not in self.corruptions:
            raise TaskError(f"{self.name} corruption {corruption!r} is unknown; choose one of "
                            f"{', '.join(self.corruptions)} (e.g. --task {self.name}:{self.default_corruption})")
        self.corruption = corruption

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.corruption}"

    def configured(self, argument: str):
        return type(self)(argument)

    def describe(self) -> dict:
        return {**super().describe(), "corruption": self.corruption,
                "corruption_description": self.corruptions[self.corruption]}


def _registry() -> dict[str, Task]:
    from spartan_cli.tasks.addition import AdditionTask
    from spartan_cli.tasks.custom import CustomTask
    from spartan_cli.tasks.greater_than import GreaterThanTask
    from spartan_cli.tasks.induction import InductionTask
    from spartan_cli.tasks.ioi import IOITask

    return {t.name: t for t in (AdditionTask(), CustomTask(), GreaterThanTask(), InductionTask(), IOITask())}


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
    """The task a built-in model was made for (``addition`` -> addition, ``shakespeare`` -> induction), else None."""
    for task in TASKS.values():
        if model_name is not None and task.native_model == model_name:
            return task
    return None
