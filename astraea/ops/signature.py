"""The inputs a rewritten graph takes besides the model's own: for each sparse block, in
GRAPH_INPUTS order, the selected rows, the cache, the change scores and the LSE scores. The
rewrite appends them (passes/rewrite.py), the lowering fakes them, the runner feeds them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAPH_INPUTS = ("idx", "cache", "change", "lse")


@dataclass(frozen=True)
class SparseBlockInputs:
    """Where a sparse block's runtime inputs sit in the rewritten graph's signature."""

    index: int
    module: str
    shape: tuple[int, ...]  # block input [B, N, D]
    dtype: torch.dtype
    shared_because: str | None = None  # why one selection serves the batch, if it does

    @property
    def samples(self) -> int:
        """S, the rows of idx and of the scores: B (a selection per sample) or 1 (one for the batch)."""
        return 1 if self.shared_because else self.shape[0]
