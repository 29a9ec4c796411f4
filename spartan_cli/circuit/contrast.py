"""Contrast batches: clean and corrupted prompts of equal length, and the metric that scores a run.

Attribution and edge patching need, per example, a clean prompt, a corrupted prompt of the same token
length, and whatever the metric reads (answer token ids). ``ContrastBatch`` is that shape; any object with
``clean``, ``corrupted``, ``attention_mask``, ``__len__`` and ``slice(start, stop)`` works the same (the
task registry may bring its own). Prompts are right-padded: with causal attention, pads after the last
real token cannot change it, so a metric that reads the last real position sees no padding.

A metric is ``metric(logits (batch, pos, vocab), batch) -> scalar tensor``, the **mean** over the batch's
rows (e.g. logit difference of the right and the wrong answer at the last real position). Higher means
"more like the clean run" is the usual convention, but nothing here depends on the sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import torch

from spartan_cli.errors import DataError


class Contrast(Protocol):
    clean: torch.Tensor  # (batch, pos) int64
    corrupted: torch.Tensor  # (batch, pos) int64
    attention_mask: torch.Tensor | None  # (batch, pos), 1 = real token; shared by clean and corrupted

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> "Contrast": ...


Metric = Callable[[torch.Tensor, Contrast], torch.Tensor]


@dataclass(frozen=True)
class ContrastBatch:
    clean: torch.Tensor  # (batch, pos) int64
    corrupted: torch.Tensor  # (batch, pos) int64
    answers: torch.Tensor | None = None  # (batch, ...) what the metric reads, e.g. (batch, 2) right/wrong ids
    attention_mask: torch.Tensor | None = None  # (batch, pos), 1 = real token, right padding

    def __post_init__(self):
        if self.clean.shape != self.corrupted.shape or self.clean.dim() != 2:
            raise DataError(f"clean and corrupted prompts must be (batch, pos) of one shape; got "
                            f"{tuple(self.clean.shape)} and {tuple(self.corrupted.shape)}: pad or drop the pairs "
                            f"whose token lengths differ")
        for name in ("answers", "attention_mask"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != self.clean.shape[0]:
                raise DataError(f"{name} has {t.shape[0]} rows but there are {self.clean.shape[0]} prompts")

    def __len__(self) -> int:
        return self.clean.shape[0]

    def slice(self, start: int, stop: int) -> ContrastBatch:
        def cut(t):
            return None if t is None else t[start:stop]

        return ContrastBatch(self.clean[start:stop], self.corrupted[start:stop], cut(self.answers),
                             cut(self.attention_mask))


def delta_rows(pos: int, n_sources: int, d_model: int, *, max_delta_mb: float, dtype=torch.float32) -> int:
    """Rows per chunk so the activation-difference buffer (n_sources, rows, pos, d_model) fits ``max_delta_mb``."""
    per_row = pos * n_sources * d_model * torch.empty((), dtype=dtype).element_size()
    return max(1, int(max_delta_mb * 2**20 // per_row))


def chunks(batches: Iterable[Contrast], *, n_sources: int, d_model: int, max_delta_mb: float,
           dtype=torch.float32) -> Iterator[Contrast]:
    """The batches, each split into row chunks whose delta buffer fits ``max_delta_mb``."""
    for batch in batches:
        rows = delta_rows(batch.clean.shape[1], n_sources, d_model, max_delta_mb=max_delta_mb, dtype=dtype)
        for start in range(0, len(batch), rows):
            yield batch if rows >= len(batch) else batch.slice(start, start + rows)

