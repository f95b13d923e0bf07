"""Attention across the ranks of a Ulysses sequence-parallel group, dense and token-sparse.

Under diffusers' context parallelism (Ulysses) each rank holds a contiguous shard of the
tokens and every head. Attention swaps that for all tokens of a slice of the heads (an
all-to-all), attends, and swaps back. The analysis collapses that traced pattern into
`astraea::ulysses_attention`, so a block's attention reads like any other self-attention;
the rewrite turns it into `astraea::ulysses_sparse_attention`, where only this rank's
selected query rows travel (keys and values of every token still do: they are attended by
every query). Every rank must pass the same number of rows: the runner selects the same
number of tokens from each shard, which keeps compute balanced and the splits equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .sparse import attention_flops, sparse_attention


def group_of(name: str) -> dist.ProcessGroup:
    """The process group a traced collective names (dynamo records groups by name)."""
    return dist.distributed_c10d._resolve_process_group(name)


def exchange(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """All-to-all: split `x` into equal parts along `scatter_dim`, send part j to rank j, and
    concatenate what arrives along `gather_dim` in rank order."""
    size = group.size()
    parts = torch.stack(x.chunk(size, scatter_dim)).contiguous()
    received = torch.empty_like(parts)
    dist.all_to_all_single(received, parts, group=group)
    return torch.cat(received.unbind(0), gather_dim)


def _across_ranks(q, k, v, group_name, attend) -> tuple[torch.Tensor, ...]:
    """Exchange heads for rows, `attend` (returning tensors laid out [B, H/P, rows, ...]), and
    exchange each result back to this rank's rows and every head."""
    group = group_of(group_name)
    if q.shape[1] % group.size():
        raise ValueError(f"Ulysses attention: {q.shape[1]} heads do not split over {group.size()} ranks")
    q, k, v = (exchange(t, group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    return tuple(exchange(t, group, scatter_dim=2, gather_dim=1).contiguous() for t in attend(q, k, v))


@torch.library.custom_op("astraea::ulysses_attention", mutates_args=())
def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, group: str) -> torch.Tensor:
    """Attention of this rank's queries over the keys/values of every rank in `group` ([B, H, N, d] each)."""
    return _across_ranks(q, k, v, group, lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, scale=scale),))[0]


@ulysses_attention.register_fake
def _(q, k, v, scale, group):
    return torch.empty_like(q)


@torch.library.custom_op("astraea::ulysses_sparse_attention", mutates_args=())
def ulysses_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, group: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`astraea::sparse_attention` for this rank's selected rows over every rank's keys/values.

    q: [B, H, K, d] (K equal on every rank); k, v: [B, H, N_local, d]. Returns out
    [B, H, K, d] and the rows' log-sum-exp [B, H, K] (fp32).
    """
    out, lse = _across_ranks(q, k, v, group, lambda q, k, v: sparse_attention(q, k, v, scale))
    return out, lse  # a pair, as the schema says


@ulysses_sparse_attention.register_fake
def _(q, k, v, scale, group):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def flop_formulas() -> dict:
    """Per-rank FLOPs: the exchanged problem is (group size) times the local shapes' count."""

    def attention(q_shape, k_shape, v_shape, scale=None, group=None, *args, **kwargs):
        return attention_flops(q_shape, k_shape, v_shape) * group_of(group).size()

    return {torch.ops.astraea.ulysses_attention: attention, torch.ops.astraea.ulysses_sparse_attention: attention}
