"""Token blocks: the one shape of data every verb consumes.

A dataset (text files, a hub dataset, or the built-in addition problems) becomes fixed-length blocks of
token ids with aligned labels; `-100` marks positions that are not scored (Hugging Face convention, the
model shifts labels by one itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBlocks:
    input_ids: torch.Tensor  # (batch, pos) int64
    labels: torch.Tensor  # (batch, pos) int64, -100 = not scored

    def __post_init__(self):
        assert self.input_ids.shape == self.labels.shape, (self.input_ids.shape, self.labels.shape)
        assert self.input_ids.dim() == 2

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def slice(self, start: int, stop: int) -> "TokenBlocks":
        return TokenBlocks(self.input_ids[start:stop], self.labels[start:stop])

    def batches(self, batch_size: int):
        """Yield consecutive TokenBlocks of at most ``batch_size`` rows, in order."""
        for start in range(0, len(self), batch_size):
            yield self.slice(start, start + batch_size)


@dataclass(frozen=True)
class Splits:
    """Training blocks and held-out blocks (the held-out set measures the target loss and density)."""

    train: TokenBlocks
    heldout: TokenBlocks
    validation: TokenBlocks | None = None  # rows never trained on that GECO may read (geco.reference "validation")
