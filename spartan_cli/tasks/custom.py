"""The ``custom:FILE`` task: your own minimal pairs, in spartan's JSONL or two formats other tools write.

1. Read ``FILE`` by its suffix into `Pair`s (clean prompt, corrupted prompt, right and wrong answers):
   - ``.jsonl``: one object a line, ``{"clean": str, "corrupted": str, "correct": str, "incorrect": str}``;
     ``correct``/``incorrect`` may also be lists of strings (several right or wrong answers).
   - ``.csv``: EAP-IG's data files (``hannamw/EAP-IG``, e.g. its IOI csv): columns ``clean``,
     ``corrupted``, ``correct_idx``, ``incorrect_idx``, the answers as **token ids** of the tokenizer the
     file was made for (other columns, like pandas' unnamed index or ``corrupted_hard``, are ignored).
     Columns ``correct``/``incorrect`` holding answer strings work too. EAP-IG's Greater-Than csv
     (a ``label`` year column, scored by probability difference) is refused: use ``--task greater-than``.
   - ``.json``: auto-circuit's prompt files (``UFO-101/auto-circuit`` ``datasets/*.json``):
     ``{"prompts": [{"clean", "corrupt", "answers": [str, ...], "wrong_answers": [str, ...]}, ...]}``.
2. Tokenise without special tokens (no BOS). Every answer string must be one token, every answer id
   inside the vocabulary, and each pair's clean and corrupted prompts must have the same token length:
   otherwise TaskError naming the rows (up to five) and the fix. Pairs are never dropped silently: a
   dataset that shrank without notice would change the circuit and its faithfulness.
3. ``contrast(n=, seed=)``: all pairs in file order, or a seeded random ``n`` of them (kept in file order).
4. Metric: logit difference at the last real position, the mean logit of the right answers minus the
   mean logit of the wrong ones (auto-circuit's ``batch_avg_answer_diff``; with one of each, EAP-IG's
   logit difference). ``answers`` per row: k right ids then k wrong ids, -1 in unused slots, k the
   largest answer count in the file (so k = 1 gives [right, wrong]).
``write_pairs`` writes pairs in any of the three formats (the csv needs a tokenizer for string answers).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from spartan_cli.errors import TaskError
from spartan_cli.tasks import (ACCURACY, LOGIT_DIFF, Task, best_is_right, contrast_batch, encode, logit_difference,
                               pad_id, show_tokens, single_token)

FORMATS = {".jsonl": "spartan rows {clean, corrupted, correct, incorrect}",
           ".csv": "EAP-IG csv (clean, corrupted, correct_idx, incorrect_idx)",
           ".json": "auto-circuit prompts {prompts: [{clean, corrupt, answers, wrong_answers}]}"}
SHOWN = 5  # rows named in an error


@dataclass(frozen=True)
class Pair:
    """One minimal pair. Answers are strings (each one token once tokenised) or token ids (EAP-IG csv)."""

    clean: str
    corrupted: str
    correct: tuple[str | int, ...]
    incorrect: tuple[str | int, ...]
    where: str = field(default="", compare=False)  # "rows.jsonl line 3", for error messages


class CustomTask(Task):
    name = "custom"
    summary = "your minimal pairs: custom:FILE (.jsonl, EAP-IG .csv, auto-circuit .json): logit diff, accuracy"
    metric_name = "logit_diff"
    metric_description = "mean logit of the right answers - mean logit of the wrong ones, last real position"
    default_n = None  # every pair in the file
    row_metrics = (LOGIT_DIFF, ACCURACY)

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)

    @property
    def spec(self) -> str:
        return self.name if self.path is None else f"{self.name}:{self.path}"

    def configured(self, argument: str) -> "CustomTask":
        if not argument:
            raise TaskError("task 'custom' needs a file: --task custom:FILE.jsonl (or an EAP-IG .csv, an "
                            "auto-circuit .json)")
        return CustomTask(argument)

    def describe(self) -> dict:
        fmt = None if self.path is None else FORMATS.get(self.path.suffix.lower())
        return {**super().describe(), "file": None if self.path is None else str(self.path), "format": fmt,
                "corruption": "as given in the file",
                "answers": "k right ids then k wrong ids per prompt, -1 = unused"}

    def pairs(self) -> list[Pair]:
        if self.path is None:
            raise TaskError("task 'custom' needs a file: --task custom:FILE.jsonl")
        return read_pairs(self.path)

    def contrast(self, tokenizer, *, n: int | None = None, seed: int = 0):
        pairs = self.pairs()
        if n is not None:
            if not 1 <= n <= len(pairs):
                raise TaskError(f"custom: n={n!r} but {self.path} holds {len(pairs)} pairs; ask for 1..{len(pairs)}")
            pairs = [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), n))]
        vocab = len(tokenizer)
        clean_rows, corrupted_rows, right, wrong = [], [], [], []
        uneven, bad_answers = [], []
        for pair in pairs:
            clean, corrupted = encode(tokenizer, pair.clean), encode(tokenizer, pair.corrupted)
            if not clean or len(clean) != len(corrupted):
                uneven.append(f"{pair.where} ({len(clean)} vs {len(corrupted)} tokens)")
            ids = []
            for answer in (*pair.correct, *pair.incorrect):
                if isinstance(answer, int):
                    ok = 0 <= answer < vocab
                    ids.append(answer if ok else None)
                    if not ok:
                        bad_answers.append(f"{pair.where}: id {answer} outside the vocabulary 0..{vocab - 1}")
                else:
                    ids.append(single_token(tokenizer, answer))
                    if ids[-1] is None:
                        bad_answers.append(f"{pair.where}: {show_tokens(tokenizer, answer)}")
            clean_rows.append(clean)
            corrupted_rows.append(corrupted)
            right.append(ids[:len(pair.correct)])
            wrong.append(ids[len(pair.correct):])
        if uneven:
            raise TaskError(f"custom: {len(uneven)} of {len(pairs)} pairs in {self.path} have clean and corrupted "
                            f"prompts of different token lengths (or empty ones): {_some(uneven)}; edit or remove "
                            "those rows (make the words that differ single tokens)")
        if bad_answers:
            raise TaskError(f"custom: answers must be single tokens of this tokenizer; {len(bad_answers)} are not: "
                            f"{_some(bad_answers)}; use answers that are one token (often with a leading space)")
        k = max(max(len(r), len(w)) for r, w in zip(right, wrong))
        answers = [r + [-1] * (k - len(r)) + w + [-1] * (k - len(w)) for r, w in zip(right, wrong)]
        return contrast_batch(clean_rows, corrupted_rows, answers, pad=pad_id(tokenizer))

    def row_scores(self, last, answers):
        return logit_difference(last, answers)  # (batch,)

    def row_values(self, last, answers) -> dict:
        return {"logit_diff": logit_difference(last, answers), "accuracy": best_is_right(last, answers)}


# ------------------------------------------------------------------------------------------ reading
def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """The pairs of a .jsonl / .csv / .json file (module docstring, step 1); TaskError naming the problem."""
    path = Path(path)
    reader = {".jsonl": _read_jsonl, ".csv": _read_csv, ".json": _read_json}.get(path.suffix.lower())
    if reader is None:
        raise TaskError(f"custom: {path} has suffix {path.suffix!r}; use one of "
                        + "; ".join(f"{k} ({v})" for k, v in FORMATS.items()))
    if not path.is_file():
        raise TaskError(f"custom: {path} does not exist; pass --task custom:FILE with an existing file")
    pairs = reader(path)
    if not pairs:
        raise TaskError(f"custom: {path} holds no pairs; add rows ({FORMATS[path.suffix.lower()]})")
    return pairs


def _answers(value, where: str, key: str) -> tuple:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise TaskError(f"custom: {where}: {key!r} must be a non-empty string or list of strings, got {value!r}")
    return tuple(values)


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise TaskError(f"custom: {where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"custom: {where} is not JSON ({err.msg}); write one object per line") from None
            if not isinstance(row, dict) or not {"clean", "corrupted", "correct", "incorrect"} <= set(row):
                raise TaskError(f"custom: {where} must be an object with keys clean, corrupted, correct, incorrect; "
                                f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}")
            pairs.append(Pair(_text(row, "clean", where), _text(row, "corrupted", where),
                              _answers(row["correct"], where, "correct"),
                              _answers(row["incorrect"], where, "incorrect"),
                              where))
    return pairs


def _read_csv(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        by_id = {"correct_idx", "incorrect_idx"} <= columns
        if not {"clean", "corrupted"} <= columns or not (by_id or {"correct", "incorrect"} <= columns):
            hint = (" This looks like EAP-IG's Greater-Than data (a year label, scored by probability difference): "
                    "use --task greater-than." if columns & {"label", "correct_idx"} else "")
            raise TaskError(f"custom: {path.name} has columns {sorted(columns)}; an EAP-IG csv needs clean, corrupted, "
                            f"correct_idx, incorrect_idx (token ids) or correct, incorrect (strings).{hint}")
        pairs = []
        for row_no, row in enumerate(reader, 1):
            where = f"{path.name} row {row_no}"
            if by_id:
                try:
                    right, wrong = (int(row["correct_idx"]),), (int(row["incorrect_idx"]),)
                except (TypeError, ValueError):
                    raise TaskError(f"custom: {where}: correct_idx/incorrect_idx must be integer token ids, got "
                                    f"{row['correct_idx']!r}, {row['incorrect_idx']!r}") from None
            else:
                right = _answers(row["correct"], where, "correct")
                wrong = _answers(row["incorrect"], where, "incorrect")
            pairs.append(Pair(_text(row, "clean", where), _text(row, "corrupted", where), right, wrong, where))
    return pairs


def _read_json(path: Path) -> list[Pair]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TaskError(f"custom: {path.name} is not JSON ({err.msg}); for one object per line name it .jsonl") \
            from None
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list):
        raise TaskError(f"custom: {path.name} must be an auto-circuit prompt file, an object with a 'prompts' list")
    pairs = []
    for i, row in enumerate(prompts):
        where = f"{path.name} prompts[{i}]"
        if not isinstance(row, dict) or not {"clean", "corrupt", "answers", "wrong_answers"} <= set(row):
            raise TaskError(f"custom: {where} must have keys clean, corrupt, answers, wrong_answers")
        pairs.append(Pair(_text(row, "clean", where), _text(row, "corrupt", where),
                          _answers(row["answers"], where, "answers"),
                          _answers(row["wrong_answers"], where, "wrong_answers"), where))
    return pairs


# ------------------------------------------------------------------------------------------ writing
def write_pairs(path: str | os.PathLike, pairs, *, tokenizer=None) -> Path:
    """Write ``pairs`` as .jsonl / .csv / .json (by suffix), atomically; ``read_pairs`` reads them back.

    The csv stores answer ids (EAP-IG's layout, one right and one wrong answer per pair): string answers
    are turned into ids with ``tokenizer``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = "".join(json.dumps({"clean": p.clean, "corrupted": p.corrupted, "correct": _one_or_list(p.correct),
                                   "incorrect": _one_or_list(p.incorrect)}) + "\n" for p in pairs)
    elif suffix == ".json":
        text = json.dumps({"prompts": [{"clean": p.clean, "corrupt": p.corrupted, "answers": list(p.correct),
                                        "wrong_answers": list(p.incorrect)} for p in pairs]}, indent=1)
    elif suffix == ".csv":
        lines = [["clean", "corrupted", "correct_idx", "incorrect_idx"]]
        for p in pairs:
            if len(p.correct) != 1 or len(p.incorrect) != 1:
                raise TaskError(f"custom: {p.where or p.clean!r} has several answers; an EAP-IG csv holds one each")
            lines.append([p.clean, p.corrupted, _token_id(p.correct[0], tokenizer),
                          _token_id(p.incorrect[0], tokenizer)])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(lines)
        text = buf.getvalue()
    else:
        raise TaskError(f"custom: cannot write {path.name}; use one of {', '.join(FORMATS)}")
    from spartan_cli.training.checkpoint import atomic_open

    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


def _one_or_list(values):
    return values[0] if len(values) == 1 else list(values)


def _token_id(answer, tokenizer) -> int:
    if isinstance(answer, int):
        return answer
    token = None if tokenizer is None else single_token(tokenizer, answer)
    if token is None:
        raise TaskError(f"custom: answer {answer!r} needs a tokenizer that makes it one token to be written as an id")
    return token


def _some(items: list[str]) -> str:
    return "; ".join(items[:SHOWN]) + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
