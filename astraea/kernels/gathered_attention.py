"""Flash-attention forward for the K recomputed query rows of a block against all N keys.

A token-sparse block recomputes only K of its N tokens, but each of those tokens must still
attend to fresh keys and values of all N. The rewritten graph gathers the K rows before the
query projection (Inductor fuses the gather into its consumers), so q arrives as [B, H, K, d]
(any strides with a contiguous last dim, e.g. a permuted [B, K, H, d] view) and the kernel
writes its [B, H, K, d] output in [B, K, H, d] order (`rows_major`), the order the graph reads
it in next (each row's heads side by side, into the output projection), so that no copy
transposes it. It also returns each row's natural-log log-sum-exp, which the selection logic
uses as a per-token attention statistic and which lets partial results be merged exactly. A
key-padding mask comes in as an additive bias per key.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .layout import rows_major

_LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, col_ok, kb,
                  MASK_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Scores live in base-2 units (scale * log2 e folded in, the key bias too) so the
    # exponentials are exp2.
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_BIAS:
        s = s + kb[None, :]
    if MASK_COLS:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _gathered_attention_kernel(
    Q, K, V, KB, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_kbb,
    stride_ob, stride_oh, stride_om,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, kv_groups, n_queries, n_keys, qk_scale,
    HAS_BIAS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # Compiled graphs may hand the scale over as fp64, which would drag the softmax into fp64.
    qk_scale = tl.cast(qk_scale, tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_queries
    rows = offs_m.to(tl.int64)

    # Rows past K read row 0 of q (never stored); the block stays rectangular for tl.dot.
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    hk = h // kv_groups  # grouped-query attention: consecutive query heads share a key/value head
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if USE_TMA:
        # Keys and values stream through the copy engine. Descriptors are built here, not on
        # the host, because torch's triton_op tracing cannot capture host descriptors. With
        # Triton 3.6 on H200 this measured level with pointer loads (host descriptors were
        # ~10% faster in a trial); it is the path to build on. Rows past n_keys read as zeros.
        k_desc = tl.make_tensor_descriptor(k_base, shape=[n_keys, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[n_keys, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    kb_ptrs = KB + b * stride_kbb + offs_n
    kb = tl.zeros([BLOCK_N], tl.float32)
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Full key blocks need no masks, so the hot loop carries none; the ragged tail gets one
    # masked step after it.
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        if USE_TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_BIAS:
            kb = tl.load(kb_ptrs + start_n) * 1.4426950408889634
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, offs_n, kb,
                                      False, HAS_BIAS, DOT_PRECISION)
    if n_full < n_keys:
        col_ok = n_full + offs_n < n_keys
        if USE_TMA:
            k = k_desc.load([n_full, 0])
            v = v_desc.load([n_full, 0])
        else:
            k = tl.load(k_ptrs + n_full * stride_kn, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + n_full * stride_vn, mask=col_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if HAS_BIAS:
            kb = tl.load(kb_ptrs + n_full, mask=col_ok, other=0.0) * 1.4426950408889634
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, col_ok, kb,
                                      True, HAS_BIAS, DOT_PRECISION)

    acc = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    out_rows = pid_bh.to(tl.int64) * n_queries + offs_m
    # m_i is in base-2 units; the library's LSE is natural log.
    tl.store(Lse + out_rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


def tiles(dtype: torch.dtype, use_tma: bool) -> dict:
    """The launch configuration: fixed, not autotuned, so the first call compiles one kernel
    and times nothing. Chosen by the three-config autotune this kernel ran before, on an H200
    at N = 32,760, d = 128, bf16 (its winners are in benchmarks/results/attention.json from
    then; the benchmark now records the configuration it ran): 128 x 128 tiles, 8 warps, 3 stages
    lead with TMA loads, 128 x 64 with pointer loads; 64 x 64 is the one that fits shared
    memory for fp32 inputs."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128 if use_tma else 64, num_warps=8, num_stages=3)


def _tma_ok(t: torch.Tensor) -> bool:
    # The copy engine needs a 16-byte aligned base and 16-byte multiples for every stride
    # but the last; the model's permuted views satisfy this, odd slices may not. Alignment is
    # read off the storage offset (allocations themselves are aligned, as Inductor assumes
    # too) because traced fake tensors have no data pointer.
    size = t.element_size()
    return all(s * size % 16 == 0 for s in (t.storage_offset(), *t.stride()[:-1]))


def _use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    if not (_tma_ok(k) and _tma_ok(v)):
        return False
    # The interpreter runs descriptor loads too, so CPU tests cover the path Hopper takes.
    return not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] >= 9


def _dot_precision(dtype: torch.dtype, head_dim: int) -> str:
    """fp32 inputs ask for fp32 answers, so no plain TF32. Three TF32 products per dot give
    them on tensor cores; "ieee" runs on the FMA units, and on an H200 took 1 ms a call on
    the reference model (head dim 64), 120x PyTorch's fp32 attention. Three-product dots are
    checked on the H200 at head dims 32 and 64 only: at 16 and 128 the kernel test failed
    there with a Triton runtime error, so those keep "ieee". At 128 it is shared memory: with
    these tiles the three-product dot asks for 256 KB a block, over the 227 KB an H200 has
    (compiled for sm_90 without a GPU by tests/gpu_compile.py); at 16 it is not diagnosed."""
    if dtype != torch.float32:
        return "tf32"  # ignored: half-precision dots run at their own precision
    return "tf32x3" if head_dim in (32, 64) else "ieee"


def _scratch(size: int, alignment: int, stream: Optional[int]) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gathered_attention: q, k, v must be [B, H, L, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"gathered_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    B, H, _, d = q.shape
    if (k.shape[0], k.shape[3]) != (B, d) or k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"gathered_attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or d, or k's "
                         "heads do not divide q's")
    if d < 16 or d > 128 or d & (d - 1):
        raise ValueError(f"gathered_attention: head dim must be a power of two in 16..128, got {d}")
    if k.shape[2] == 0:
        raise ValueError("gathered_attention: there must be at least one key")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"gathered_attention: q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"gathered_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"gathered_attention: q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"gathered_attention: {name} must be contiguous in its last dim, "
                             f"got strides {t.stride()}")
    if key_bias is not None:
        if key_bias.dim() != 2 or key_bias.shape[0] not in (1, q.shape[0]) or key_bias.shape[1] != k.shape[2]:
            raise ValueError(f"gathered_attention: key_bias must be [1 or B={q.shape[0]}, N={k.shape[2]}], "
                             f"got {tuple(key_bias.shape)}")
        if key_bias.dtype != torch.float32 or key_bias.stride(-1) != 1 or key_bias.device != q.device:
            raise TypeError("gathered_attention: key_bias must be float32, contiguous in N, on q's device")


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: Optional[float] = None,
                       key_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + key_bias) v and its natural-log LSE, as ([B, H, K, d] laid out
    `rows_major`, [B, H, K] fp32), for q [B, H, K, d] and k, v [B, H / G, N, d] (grouped-query
    attention: each key/value head serves G consecutive query heads, as SDPA's `enable_gqa`
    reads them). key_bias ([B or 1, N] fp32, -inf for a masked key) is a key-padding mask as an
    additive bias, the same for every head and query (text padding in joint attention).
    """
    _check(q, k, v, key_bias)
    B, H, n_queries, d = q.shape
    out = rows_major(q)
    lse = torch.empty((B, H, n_queries), dtype=torch.float32, device=q.device)
    if n_queries == 0 or B * H == 0:
        return out, lse
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not scale > 0:
        # No attention scales by zero, a negative number or NaN: such a scale is a bug upstream.
        raise ValueError(f"gathered_attention: scale must be positive, got {scale}")
    args = (q, k, v, lse if key_bias is None else key_bias, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            0 if key_bias is None or key_bias.shape[0] == 1 else key_bias.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            H, H // k.shape[1], n_queries, k.shape[2], scale * _LOG2E)
    consts = dict(HAS_BIAS=key_bias is not None, HEAD_DIM=d, USE_TMA=_use_tma(k, v),
                  DOT_PRECISION=_dot_precision(q.dtype, d))

    def grid(meta):
        return (triton.cdiv(n_queries, meta["BLOCK_M"]), B * H)

    if q.is_cuda:
        if consts["USE_TMA"]:
            # Descriptors made on the device live in a scratch buffer Triton asks the
            # allocator for (Inductor installs the same kind of allocator for its launches).
            triton.set_allocator(_scratch)
        _gathered_attention_kernel[grid](*args, UPCAST=False, **consts, **tiles(q.dtype, consts["USE_TMA"]))
    else:
        # CPU tensors only run under TRITON_INTERPRET=1: its bf16 arithmetic is wrong, so
        # everything is upcast, and one small tile keeps it quick.
        _gathered_attention_kernel[grid](*args, UPCAST=True, BLOCK_M=16, BLOCK_N=32, **consts)
    return out, lse


def gathered_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 scale: Optional[float] = None,
                                 key_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch in fp32 (fp64 for fp64 inputs): what the kernel must match, and the CPU
    path without Triton. Returns out in q's dtype and lse in the compute dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    compute = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias.to(compute)[:, None, None, :]
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.to(compute))
    return out.to(q.dtype), lse
