"""What `merge_rows` computes, in plain PyTorch: the CPU path of the library, and what the
Triton kernel in `merge.py` must match. No Triton here, so the library imports it without."""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn; cached contributions are clamped to it
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def check_merge_args(x, rows, idx, cache, change, lse_rows, lse_state, slope=None, stale=None, span=None) -> None:
    """The shapes and dtypes merge_rows takes (both paths check them: a wrong shape must not broadcast)."""
    if x.dim() != 3:
        raise ValueError(f"merge_rows: x must be [B, N, D], got {tuple(x.shape)}")
    B, N, D = x.shape
    if idx.dim() != 2 or idx.shape[0] not in (1, B) or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"merge_rows: idx must be a [1 or B={B}, K] int64 or int32 tensor, got {idx.dtype} "
                        f"of shape {tuple(idx.shape)}")
    S, K = idx.shape
    if rows.shape != (B, K, D):
        raise ValueError(f"merge_rows: rows must be [B, K, D] = {(B, K, D)}, got {tuple(rows.shape)}")
    if cache.shape != x.shape:
        raise ValueError(f"merge_rows: cache must be {tuple(x.shape)}, got {tuple(cache.shape)}")
    if change.shape != (S, N) or lse_state.shape != (S, N):
        raise ValueError(f"merge_rows: change and lse_state must be [S, N] = {[S, N]}, got "
                         f"{tuple(change.shape)} and {tuple(lse_state.shape)}")
    if lse_rows is not None and (lse_rows.dim() != 3 or lse_rows.shape[0] != B or lse_rows.shape[2] != K):
        raise ValueError(f"merge_rows: lse_rows must be [B, H, K] with B={B}, K={K}, got {tuple(lse_rows.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"merge_rows: x dtype must be float32, bfloat16 or float16, got {x.dtype}")
    if rows.dtype != x.dtype:
        raise TypeError(f"merge_rows: rows dtype {rows.dtype} differs from x dtype {x.dtype}")
    if cache.dtype not in CACHE_DTYPES:
        raise TypeError(f"merge_rows: cache dtype must be one of {CACHE_DTYPES}, got {cache.dtype}")
    for name, t in (("change", change), ("lse_state", lse_state), ("lse_rows", lse_rows)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"merge_rows: {name} must be float32, got {t.dtype}")
    if (slope is None) != (stale is None) or (slope is None) != (span is None):
        raise ValueError("merge_rows: slope, stale and span come together (the forecasts' slopes kept) or not at all")
    if slope is not None:
        if slope.shape != x.shape or slope.dtype != cache.dtype or cache.dtype == torch.float8_e4m3fn:
            raise ValueError(f"merge_rows: slope must be {tuple(x.shape)} in the cache's dtype (not float8), got "
                             f"{tuple(slope.shape)} {slope.dtype}")
        if stale.shape != (S, N) or stale.dtype != torch.int32 or span.shape != (S, K) or span.dtype != torch.float32:
            raise ValueError(f"merge_rows: stale must be [S, N] = {[S, N]} int32 and span [S, K] = {[S, K]} float32, "
                             f"got {tuple(stale.shape)} {stale.dtype} and {tuple(span.shape)} {span.dtype}")
    named = (("x", x), ("rows", rows), ("idx", idx), ("cache", cache), ("change", change),
             ("lse_rows", lse_rows), ("lse_state", lse_state), ("slope", slope), ("stale", stale), ("span", span))
    for name, t in named:
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"merge_rows: {name} must be contiguous, got strides {t.stride()}")
        if t.device != x.device:
            raise ValueError(f"merge_rows: {name} on {t.device}, x on {x.device}")


def merge_rows_reference(x, rows, idx, cache, change, lse_rows, lse_state, slope=None, stale=None, span=None,
                         forecast=False):
    """Plain PyTorch merge_rows: the CPU path, and what the Triton kernel must match."""
    check_merge_args(x, rows, idx, cache, change, lse_rows, lse_state, slope, stale, span)
    batch, shared = torch.arange(x.shape[0], device=x.device)[:, None], idx.shape[0] == 1
    at = (batch, idx.expand(x.shape[0], -1))  # [B, K] rows of [B, N, ...]
    reused = cache.float() + slope.float() * stale[..., None].float() if forecast else cache
    y = x + reused.to(x.dtype)
    y[at] = rows
    new = rows.float() - x[at].float()
    moved = new - cache[at].float()
    if slope is not None:  # the last difference per step, from the steps since each row was last computed
        slope[at] = (moved / span.expand(x.shape[0], -1)[..., None]).to(slope.dtype)
    moved = moved.norm(dim=-1)  # [B, K]
    change.scatter_(1, idx, moved.mean(0, keepdim=True) if shared else moved)
    if cache.dtype == torch.float8_e4m3fn:
        new = new.clamp(-FP8_MAX, FP8_MAX)
    cache[at] = new.to(cache.dtype)  # indexed assignment: index_copy_ has no fp8 kernel on CPU
    if lse_rows is not None:
        lse = lse_rows.float().mean(1)  # [B, K]
        lse_state.scatter_(1, idx, lse.mean(0, keepdim=True) if shared else lse)
    return y
