"""The operators the rewritten graph calls: two registered with torch.library, one plain.

`astraea::sparse_attention(q, k, v)` is attention for the selected query rows over all keys
and values, and also returns each row's natural-log log-sum-exp (the selection score's
S_LSE). `astraea::merge_rows` assembles a block's output from its fresh rows and its cache,
and updates the cache and the score state in the same pass. Both are opaque custom ops so
that Inductor treats them as single nodes; the kernels in `astraea/kernels/` implement them on GPU.
`gather_tokens` picks the selected rows of a tensor, per sample; it and the other functions of
`GRAPH_FUNCTIONS` (the rows of a joint token axis, its split) are plain PyTorch, which Inductor
fuses into their consumers.
"""

from __future__ import annotations

import torch

from astraea.kernels.layout import rows_major, rows_major_strides
from astraea.kernels.merge_reference import merge_rows_reference



def gather_tokens(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx[s]` of `x` along `dim` for each sample s. idx: [S, K]; S = 1 takes the same
    rows for the whole batch, else dim 0 of x is the batch of S samples, or 1 for a table every
    sample shares (the result then has S)."""
    samples, k = idx.shape
    if samples == 1:
        return x.index_select(dim, idx[0])
    shape = list(x.shape)
    shape[0] = samples
    index = [1] * x.dim()
    index[0], index[dim] = samples, k
    x = x.expand(shape)
    shape[dim] = k
    return x.gather(dim, idx.view(index).expand(shape))


def gather_folded_tokens(x: torch.Tensor, dim: int, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `idx[0]` of every sample's `n` tokens along `dim`, which holds (sample, token) pairs
    sample-major (a per-token table of factorised attention, [B * N, ...]); idx: [1, K]."""
    grouped = x.unflatten(dim, (x.shape[dim] // n, n)).index_select(dim + 1, idx[0])
    return grouped.flatten(dim, dim + 1)


def pad_channels(x: torch.Tensor, widths: tuple, value: float | None = None) -> torch.Tensor:
    """`F.pad(x, widths, value=value)` with zeros or `value` for a rows form, where the pad
    spares the token axis (a head dim padded to a size the attention kernels take). Written as
    concatenations: the fake kernel of aten's `constant_pad_nd` reads every size as a number,
    which would fix the number of selected rows in the lowered code."""
    for i in range(0, len(widths), 2):
        dim = x.dim() - 1 - i // 2
        before, after = widths[i], widths[i + 1]
        if before < 0 or after < 0:
            x = x.narrow(dim, max(-before, 0), x.shape[dim] - max(-before, 0) - max(-after, 0))
            before, after = max(before, 0), max(after, 0)
        fill = [x.new_full((*x.shape[:dim], n, *x.shape[dim + 1:]), value or 0) for n in (before, after)]
        x = torch.cat([fill[0], x, fill[1]], dim) if before or after else x
    return x


def frame_positions(idx: torch.Tensor, frames: int) -> torch.Tensor:
    """[S, K / F]: the positions selected in every frame, from the rows `idx` [S, K] of a flat
    stream of F frames that select the same positions, frame-major (the first frame's rows)."""
    return idx[:, : idx.shape[1] // frames]


def split_rows(x: torch.Tensor, dim: int, bounds: list) -> tuple:
    """A split of `x` along `dim` at the given slices (a split of a joint tensor's rows form)."""
    lead = (slice(None),) * dim
    return tuple(x[(*lead, b)] for b in bounds)


def segment_rows(idx: torch.Tensor, sizes: tuple, video: int) -> torch.Tensor:
    """[S, rows]: every row of each small segment and the selected rows of the video segment,
    at their offsets in a joint token axis of segment `sizes`."""
    parts, at = [], 0
    for i, size in enumerate(sizes):
        if i == video:
            parts.append(idx + at)
        else:
            parts.append(torch.arange(at, at + size, device=idx.device).expand(idx.shape[0], -1))
        at += size
    return torch.cat(parts, dim=1)


# The plain functions a rewritten graph calls (Inductor traces through them).
GRAPH_FUNCTIONS = (gather_tokens, gather_folded_tokens, segment_rows, split_rows, pad_channels, frame_positions)


@torch.library.custom_op("astraea::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, attn_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, K, d] selected queries; k, v: [B, H / G, N, d] (G > 1: grouped-query attention,
    each key/value head serving G consecutive query heads, as SDPA's `enable_gqa`); attn_mask
    (bool or additive) broadcasts to [B, H, K, N]. Returns out [B, H, K, d] laid out in [B, K, H,
    d] order (the graph merges each row's heads next, without a copy), lse [B, H, K] (fp32)."""
    _check_heads(q, k, v)
    out, lse = _attention(q, k, v, scale, attn_mask)
    return _in_rows_major(out), lse.reshape(*q.shape[:2], -1)[..., : q.shape[2]].float().contiguous()


def _attention(q, k, v, scale, attn_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """out and lse from the fastest kernel that takes these inputs: on a GPU, PyTorch's cuDNN
    attention (half types, as many key as query heads, no mask: 1-15% faster than the Triton
    kernel on an H100, `benchmarks/attention.py`), the Triton kernel (a key bias, grouped-query
    heads read in place, float32), PyTorch's memory-efficient kernel (a mask differing between
    queries or heads); PyTorch's CPU kernel on the CPU. lse may come padded or as [B, H, K, 1]."""
    key_bias = _key_bias(attn_mask, k.shape[2])
    if q.is_cuda and attn_mask is None and k.shape[1] == q.shape[1] and torch.backends.cuda.cudnn_sdp_enabled():
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
        if torch.backends.cuda.can_use_cudnn_attention(params):
            return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
    if q.is_cuda and (attn_mask is None or key_bias is not None):
        from astraea.kernels.gathered_attention import gathered_attention

        return gathered_attention(q, k, v, scale=scale, key_bias=key_bias)  # reads the groups' heads in place
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))  # PyTorch's kernels below
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if q.is_cuda:  # a mask that differs between queries or heads
        bias = _aligned_rows(attn_mask.to(q.dtype)).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, scale=scale)[:2]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
    )[:2]


def _in_rows_major(out: torch.Tensor) -> torch.Tensor:
    """`out` laid out as the op's fake says (`rows_major`: [B, K, H, d] order), copied only
    where its kernel wrote another order."""
    if out.stride() == rows_major_strides(out.shape):
        return out
    return rows_major(out).copy_(out)


def _aligned_rows(bias: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """`bias` with each row starting at a multiple of 16 elements, as PyTorch's memory-efficient
    kernel requires of its bias (SDPA pads a mask the same way before it calls the kernel)."""
    keys = bias.shape[-1]
    if bias.dim() >= 2 and bias.stride(-1) == 1 and all(s % multiple == 0 for s in bias.stride()[:-1]):
        return bias
    pad = -keys % multiple
    return torch.nn.functional.pad(bias, (0, pad))[..., :keys] if pad else bias.contiguous()


def _key_bias(mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """A mask that is the same for every head and query (key padding: HunyuanVideo's text
    mask, [B, 1, 1, N]) as the kernel's additive fp32 key bias [B or 1, N]; else None."""
    if mask is None or mask.dim() > 4 or mask.shape[-1] != n_keys:
        return None
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1:
        return None
    rows = mask.reshape(shape[0], n_keys)
    if rows.dtype == torch.bool:
        return torch.zeros(rows.shape, dtype=torch.float32, device=rows.device).masked_fill(~rows, float("-inf"))
    return rows.float().contiguous()


@sparse_attention.register_fake
def _(q, k, v, scale=None, attn_mask=None):
    _check_heads(q, k, v)
    return rows_major(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _check_heads(q, k, v) -> None:
    torch._check(k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0,
                 lambda: f"sparse_attention: the key/value heads must divide the query heads: q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")


# Every argument it writes is required, None included: torch 2.11's ADInplaceOrView kernel of a
# custom op finds the written arguments by position among those passed, and a call that leaves
# one to its default (dropped from the call as it reaches Python) fails there with an IndexError.
@torch.library.custom_op("astraea::merge_rows", mutates_args=("cache", "change", "lse_state", "slope"))
def merge_rows(
    x: torch.Tensor,
    rows: torch.Tensor,
    idx: torch.Tensor,
    cache: torch.Tensor,
    change: torch.Tensor,
    lse_rows: torch.Tensor | None,
    lse_state: torch.Tensor,
    slope: torch.Tensor | None,
    stale: torch.Tensor | None,
    span: torch.Tensor | None,
    forecast: bool = False,
) -> torch.Tensor:
    """Block output: fresh `rows` at `idx`, `x + cache` elsewhere; refresh cache and scores.

    x: [B, N, D] block input; rows: [B, K, D]; idx: [S, K] (S = B: each sample's own rows, or
    1: the same rows for the batch); cache: [B, N, D]; change, lse_state: [S, N]. With S = 1
    the scores are the batch's means. Where the forecasts' slopes are kept (runtime/forecast.py):
    slope [B, N, D] in the cache's dtype, each recomputed row's refreshed in the same pass as its
    cache; stale [S, N] the tokens' staleness after this call's selection; span [S, K] the steps
    since each recomputed row was last computed; with `forecast`, the rows not recomputed get
    `x + cache + slope * stale`. Without slopes the three are None.
    """
    if forecast and slope is None:
        raise ValueError("merge_rows: forecasting needs the slopes (slope, stale, span)")
    x, rows = x.contiguous(), rows.contiguous()
    lse_rows = lse_rows.contiguous() if lse_rows is not None else None
    merge = merge_rows_reference
    if x.is_cuda:
        from astraea.kernels.merge import merge_rows as merge
    return merge(x, rows, idx, cache, change, lse_rows, lse_state, slope, stale, span, forecast)


@merge_rows.register_fake
def _(x, rows, idx, cache, change, lse_rows, lse_state, slope, stale, span, forecast=False):
    return x.new_empty(x.shape)  # contiguous, as both paths return it whatever x's strides


def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula of an attention op with SDPA's (q, k, v) shapes."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


def flop_formulas() -> dict:
    """FLOP formulas for FlopCounterMode(custom_mapping=...): our attention and CPU flash SDPA."""
    return {  # FlopCounterMode looks ops up by their overload packet
        torch.ops.astraea.sparse_attention: attention_flops,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
    }
