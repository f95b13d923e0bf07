"""Merge a token-sparse block's fresh rows with its cache, in one pass over memory.

After a block has recomputed K of its N tokens, every token needs an output: the fresh row
for the K selected, the input plus the cached contribution for the rest. The same pass
refreshes the cache for the selected tokens, records how far each one's contribution moved
(the change score the next step's selection reads) and, when given, the mean attention LSE
per token: per sample when each sample selects its own tokens, as the batch's means when one
selection serves it. Done in PyTorch this is a gather, a scatter and several elementwise passes over
[B, N, D]; here each element of x and cache is read once and y written once.

float8_e4m3fn caches store the contribution unscaled, saturated to +-448 (the format's
largest finite value; e4m3fn has no infinity, so an unsaturated overflow would be NaN). A
fixed scheme needs no scale bookkeeping per block; its cost is e4m3's 3 mantissa bits and
that magnitudes under 2^-10 round to zero.
"""
from typing import Optional

import torch
import triton
import triton.language as tl


# The plain PyTorch semantics (the CPU path of the library) is what the kernel must match.
from .merge_reference import FP8_MAX, check_merge_args, merge_rows_reference  # noqa: F401  (re-exported)

@triton.jit
def _merge_rows_kernel(
    X, ROWS, INV, CACHE, CHANGE, LSE_ROWS, LSE_STATE, Y, SLOPE, STALE, SPAN,
    B, N, D, K, H,
    HAS_LSE: tl.constexpr, PER_SAMPLE: tl.constexpr, CLAMP: tl.constexpr, SLOPES: tl.constexpr,
    FORECAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < N
    # inv[s, n] is n's position in idx[s], or -1 for a token sample s did not recompute; one
    # row serves every sample unless PER_SAMPLE.
    j = tl.load(INV + offs_r, mask=r_ok, other=-1)
    norm_sum = tl.zeros([BLOCK_R], tl.float32)
    lse_sum = tl.zeros([BLOCK_R], tl.float32)
    for b in range(B):
        if PER_SAMPLE:
            j = tl.load(INV + b * N + offs_r, mask=r_ok, other=-1)
        sel = j >= 0
        x_row = (b * N + offs_r).to(tl.int64) * D
        f_row = (b * K + j).to(tl.int64) * D
        s = b if PER_SAMPLE else 0  # the selection's row of stale and span
        if FORECAST:  # steps since each token was last computed (0 for the rows recomputed now)
            stale = tl.load(STALE + s * N + offs_r, mask=r_ok, other=0).to(tl.float32)
        if SLOPES:  # steps since each recomputed row was last computed, before this call
            span = tl.load(SPAN + s * K + j, mask=sel, other=1.0)
        sq = tl.zeros([BLOCK_R], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m_all = r_ok[:, None] & (offs_d < D)[None, :]
            m_sel = sel[:, None] & (offs_d < D)[None, :]
            xy_off = x_row[:, None] + offs_d[None, :]
            x = tl.load(X + xy_off, mask=m_all, other=0.0).to(tl.float32)
            c = tl.load(CACHE + xy_off, mask=m_all, other=0.0).to(tl.float32)
            fresh = tl.load(ROWS + f_row[:, None] + offs_d[None, :], mask=m_sel, other=0.0).to(tl.float32)
            if FORECAST:  # the contribution forecast to this step: cache + slope * staleness
                slope = tl.load(SLOPE + xy_off, mask=m_all, other=0.0).to(tl.float32)
                ahead = c + slope * stale[:, None]
            else:
                ahead = c
            # Round the reused contribution to x's dtype before adding, as x + cache.to(x.dtype) does.
            reused = x + ahead.to(X.dtype.element_ty).to(tl.float32)
            tl.store(Y + xy_off, tl.where(sel[:, None], fresh, reused).to(Y.dtype.element_ty), mask=m_all)
            new = fresh - x
            diff = tl.where(m_sel, new - c, 0.0)
            sq += tl.sum(diff * diff, 1)
            if SLOPES:
                tl.store(SLOPE + xy_off, (diff / span[:, None]).to(SLOPE.dtype.element_ty), mask=m_sel)
            if CLAMP > 0:
                new = tl.minimum(tl.maximum(new, -CLAMP), CLAMP)
            tl.store(CACHE + xy_off, new.to(CACHE.dtype.element_ty), mask=m_sel)
        lse = tl.zeros([BLOCK_R], tl.float32)
        if HAS_LSE:
            for h in range(H):
                lse += tl.load(LSE_ROWS + (b * H + h) * K + j, mask=sel, other=0.0)
            lse = lse / H
        if PER_SAMPLE:
            tl.store(CHANGE + b * N + offs_r, tl.sqrt(sq), mask=sel)
            if HAS_LSE:
                tl.store(LSE_STATE + b * N + offs_r, lse, mask=sel)
        else:
            norm_sum += tl.sqrt(sq)
            lse_sum += lse
    if not PER_SAMPLE:
        sel = j >= 0
        tl.store(CHANGE + offs_r, norm_sum / B, mask=sel)
        if HAS_LSE:
            tl.store(LSE_STATE + offs_r, lse_sum / B, mask=sel)


def merge_rows(x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, cache: torch.Tensor,
               change: torch.Tensor, lse_rows: Optional[torch.Tensor],
               lse_state: torch.Tensor, slope: Optional[torch.Tensor] = None, stale: Optional[torch.Tensor] = None,
               span: Optional[torch.Tensor] = None, forecast: bool = False) -> torch.Tensor:
    """Return y (x + cache, with the rows named by idx replaced by ``rows``); update cache,
    change and (when lse_rows is given) lse_state in place at idx, as merge_rows_reference.
    With the forecasts' slopes (slope, stale, span), also each recomputed row's slope; with
    `forecast`, the rows not recomputed get cache + slope * stale instead of the cache.

    idx must hold unique, valid token numbers per row; duplicates leave which row wins unspecified.
    """
    check_merge_args(x, rows, idx, cache, change, lse_rows, lse_state, slope, stale, span)
    B, N, D = x.shape
    S, K = idx.shape
    if K == 0 or B * D == 0:
        # Nothing recomputed: every token reuses its cache (or its forecast), and there is nothing to update.
        return merge_rows_reference(x, rows, idx, cache, change, lse_rows, lse_state, slope, stale, span, forecast)
    y = torch.empty_like(x)
    positions = torch.arange(K, dtype=torch.int32, device=x.device).expand(S, K)
    inv = torch.full((S, N), -1, dtype=torch.int32, device=x.device).scatter_(1, idx.long(), positions)
    BLOCK_D = min(triton.next_power_of_2(D), 512)
    BLOCK_R = max(1, 2048 // BLOCK_D)
    H = 0 if lse_rows is None else lse_rows.shape[1]
    slopes = slope is not None
    _merge_rows_kernel[(triton.cdiv(N, BLOCK_R),)](
        # The kernel never reads what it is not given; any tensor holds its place.
        x, rows, inv, cache, change, change if lse_rows is None else lse_rows, lse_state, y,
        slope if slopes else cache, stale if slopes else change, span if slopes else change,
        B, N, D, K, H,
        HAS_LSE=lse_rows is not None, PER_SAMPLE=S > 1, CLAMP=FP8_MAX if cache.dtype == torch.float8_e4m3fn else 0.0,
        SLOPES=slopes, FORECAST=forecast, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return y
