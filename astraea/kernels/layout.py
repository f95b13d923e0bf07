"""How attention outputs are laid out: [B, H, K, d] tensors stored in [B, K, H, d] order.

After attention a block merges each row's heads into one vector for the output projection
(`out.transpose(1, 2).reshape(B, K, H * d)`); stored in that order, the merge is a view and not
a copy. PyTorch's cuDNN attention writes this order for queries that come in it (gathered rows
of a [B, N, H, d] projection), the Triton kernel writes it, and `astraea::sparse_attention`
says it to the compiler. No Triton here: the op's fake kernel uses it on machines without.
"""

from __future__ import annotations

import torch


def rows_major_strides(shape) -> tuple[int, int, int, int]:
    """The strides of a [B, H, K, d] tensor stored in [B, K, H, d] order."""
    _, heads, rows, d = shape
    return rows * heads * d, d, heads * d, 1


def rows_major(like: torch.Tensor) -> torch.Tensor:
    """An empty tensor of `like`'s [B, H, K, d] shape and dtype, laid out in [B, K, H, d] order."""
    return torch.empty_strided(like.shape, rows_major_strides(like.shape), dtype=like.dtype, device=like.device)
