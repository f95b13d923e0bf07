"""Per-branch runtime state: each sparse block's cache and selection scores.

One `BranchState` per branch of classifier-free guidance, so the conditional and the
unconditional calls never read each other's caches. Tensors are allocated once and updated
in place by the graph (`astraea::merge_rows`), never reassigned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AstraeaConfig
from ..ops.signature import BlockInputs


def cache_dtype(config: AstraeaConfig, hidden_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the caches: the config's, or the hidden states' for "auto"."""
    return hidden_dtype if config.cache_dtype == "auto" else getattr(torch, config.cache_dtype)


@dataclass
class BlockState:
    """A block's cache, and its scores with one row per selection: S = B rows when each sample
    selects its own tokens, S = 1 when one selection serves the batch."""

    cache: torch.Tensor  # [B, N, D]: what the block last added to each token
    change: torch.Tensor  # [S, N] fp32: how much that contribution moved at its last refresh
    lse: torch.Tensor  # [S, N] fp32: the token's self-attention log-sum-exp at its last refresh
    stale: torch.Tensor  # [S, N] int32: steps since the token was last recomputed
    slope: torch.Tensor | None = None  # [B, N, D] cache dtype, while forecasting: per step (forecast.py)

    @classmethod
    def allocate(cls, shape, dtype, device, samples: int) -> "BlockState":
        rows = (samples, shape[1])
        return cls(
            cache=torch.zeros(shape, dtype=dtype, device=device),
            change=torch.zeros(rows, dtype=torch.float32, device=device),
            lse=torch.zeros(rows, dtype=torch.float32, device=device),
            stale=torch.zeros(rows, dtype=torch.int32, device=device),
        )

    def graph_inputs(self, idx: torch.Tensor) -> BlockInputs:
        """This block's inputs of the rewritten graph, selecting the rows `idx`."""
        return BlockInputs(idx=idx, cache=self.cache, change=self.change, lse=self.lse)

    def slope_inputs(self, names: tuple[str, ...], span: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """This block's inputs `names` (ops/signature.py) of a form of the graph that uses the
        slopes, beyond `graph_inputs`; `span`: this call's, where the form takes it."""
        return tuple(span if name == "span" else getattr(self, name) for name in names)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.cache, self.change, self.lse, self.stale, self.slope) if t is not None)


@dataclass
class BranchState:
    blocks: list[BlockState]
    last_output: tuple | None = None  # the last output, kept for skip="output" (a budget-0 step reuses it)
    filled: bool = False  # a call has filled the caches

    def reset(self) -> None:
        """As allocated, in place (captured call graphs read these tensors where they are)."""
        for block in self.blocks:
            for t in block.tensors():
                t.zero_()
        self.last_output = None
        self.filled = False
