"""The Triton kernels against plain PyTorch references (fp64 where the reference itself is
under test). On a machine without a GPU they run through the Triton interpreter (set up in
conftest.py), which is slow: shapes stay near 100 tokens and head dims at or below 64."""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from astraea.kernels import (gathered_attention, gathered_attention_reference, merge_rows, merge_rows_reference,
                             rows_major)
from tests import gpu_compile

# The package exports the function under the module's name; reach the module itself.
ga_module = importlib.import_module("astraea.kernels.gathered_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Output tolerances: fp32 is exact up to summation order; half types carry one rounding of
# the output (the interpreter truncates bf16 instead of rounding it, hence the bf16 margin).
ATTN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _qkv(B, H, Lq, N, d, dtype, seed=0):
    """q, k, v as the model passes them: [B, L, H, d] storage viewed as [B, H, L, d]."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, L, H, d, generator=g).to(DEVICE, dtype).transpose(1, 2) for L in (Lq, N, N))
    return q, k, v


def _rows(q, idx):
    """The query rows `idx` as the rewritten graph hands them over: gathered from the [B, L, H, d]
    storage, so a [B, H, K, d] view that is not contiguous."""
    return q if idx is None else q.transpose(1, 2)[:, idx].transpose(1, 2)


def _check_attention(q, k, v, idx=None, scale=None):
    q = _rows(q, idx)
    out, lse = gathered_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == rows_major(q).stride()
    assert lse.shape == out.shape[:3] and lse.dtype == torch.float32
    ref_out, ref_lse = gathered_attention_reference(q.double(), k.double(), v.double(), scale)
    atol, rtol = ATTN_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[q.dtype], rtol=0)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64])
def test_attention_gathered_rows(dtype, d):
    # N = 100 leaves a ragged key tail and K = 37 a ragged query block; idx is unsorted.
    q, k, v = _qkv(2, 3, 100, 100, d, dtype)
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(1))[:37].to(DEVICE)
    _check_attention(q, k, v, idx)


@pytest.mark.parametrize("case", ["all_rows", "one_row", "every_row_shuffled", "sorted",
                                  "one_key", "exact_blocks", "cross_lengths"])
def test_attention_shapes(case):
    Lq, N, idx = 100, 100, None
    if case == "one_row":
        idx = torch.tensor([57])
    elif case == "every_row_shuffled":
        idx = torch.randperm(100, generator=torch.Generator().manual_seed(2))
    elif case == "sorted":
        idx = torch.arange(3, 100, 7)
    elif case == "one_key":
        N = 1
    elif case == "exact_blocks":
        Lq, N = 64, 64
    elif case == "cross_lengths":
        Lq, N, idx = 90, 23, torch.tensor([89, 0, 45, 12])
    q, k, v = _qkv(1, 2, Lq, N, 32, torch.float32, seed=3)
    _check_attention(q, k, v, None if idx is None else idx.to(DEVICE))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_attention_grouped_query_heads(kv_heads):
    """Fewer key/value heads than query heads (SDPA's enable_gqa): each serves consecutive
    query heads, read in place; the reference agrees with PyTorch's own grouped-query SDPA."""
    q, _, _ = _qkv(2, 4, 40, 50, 32, torch.float32)
    _, k, v = _qkv(2, kv_heads, 40, 50, 32, torch.float32, seed=1)
    out, lse = _check_attention(q, k, v, torch.arange(0, 40, 3, device=DEVICE))
    expected = torch.nn.functional.scaled_dot_product_attention(_rows(q, torch.arange(0, 40, 3, device=DEVICE)), k, v,
                                                                enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        gathered_attention(q, *_qkv(2, 3, 40, 50, 32, torch.float32)[1:])


def test_attention_head_dims_16_and_128():
    for d in (16, 128):
        q, k, v = _qkv(1, 1, 40, 70, d, torch.float32, seed=d)
        _check_attention(q, k, v, torch.tensor([5, 39, 0, 17], device=DEVICE), scale=0.3)


def test_attention_contiguous_and_misaligned_inputs():
    q, k, v = (t.contiguous() for t in _qkv(1, 2, 50, 50, 32, torch.float16, seed=4))
    assert ga_module._use_tma(k, v)
    _check_attention(q, k, v, torch.arange(0, 50, 3, device=DEVICE))
    # A slice one element in has an unaligned base and odd strides: the pointer path runs.
    wide = torch.randn(1, 2, 50, 33, dtype=torch.float16, device=DEVICE)
    k1, v1 = wide[..., 1:], wide.flip(2)[..., 1:]
    assert not ga_module._use_tma(k1, v1)
    _check_attention(q, k1, v1, torch.arange(0, 50, 3, device=DEVICE))


def test_attention_lse_is_natural_log():
    # Zero queries score every key 0: softmax is uniform, LSE = ln N, output = mean of v.
    q, k, v = _qkv(1, 1, 10, 77, 32, torch.float32, seed=5)
    q = torch.zeros_like(q)
    out, lse = gathered_attention(q, k, v)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(77)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), atol=1e-5, rtol=1e-5)


def test_attention_reference_matches_fp64_softmax():
    q, k, v = _qkv(1, 2, 20, 30, 16, torch.float32, seed=6)
    out, lse = gathered_attention_reference(q, k, v, scale=0.2)
    s = q.double() @ k.double().transpose(-1, -2) * 0.2
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), torch.softmax(s, -1) @ v.double(), atol=1e-5, rtol=1e-5)


def _poisoned_allocations(monkeypatch):
    """Make every fresh float tensor NaN, so a row the kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def test_attention_writes_every_row(monkeypatch):
    _poisoned_allocations(monkeypatch)
    q, k, v = _qkv(2, 2, 70, 45, 32, torch.bfloat16, seed=7)
    out, lse = _check_attention(q, k, v, torch.arange(69, -1, -2, device=DEVICE))
    assert not out.isnan().any() and not lse.isnan().any()


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), Lq=st.integers(1, 70), N=st.integers(1, 90),
       d=st.sampled_from([16, 32]), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), use_idx=st.booleans())
def test_attention_property(B, H, Lq, N, d, frac, seed, use_idx):
    q, k, v = _qkv(B, H, Lq, N, d, torch.float32, seed=seed)
    K = max(1, round(frac * Lq))
    idx = torch.randperm(Lq, generator=torch.Generator().manual_seed(seed))[:K].to(DEVICE) if use_idx else None
    _check_attention(q, k, v, idx)


@pytest.mark.parametrize("bad, error", [
    (lambda q, k, v: (q[0], k, v), ValueError),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError),
    (lambda q, k, v: (q, k.half(), v), TypeError),
    (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), ValueError),
    (lambda q, k, v: (q, k.transpose(2, 3).contiguous().transpose(2, 3), v), ValueError),
    (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError),
])
def test_attention_rejects_bad_inputs(bad, error):
    with pytest.raises(error, match="gathered_attention"):
        gathered_attention(*bad(*_qkv(1, 2, 8, 8, 32, torch.float32)))


def test_attention_rejects_bad_scale_and_key_bias():
    q, k, v = _qkv(1, 1, 8, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="scale"):
        gathered_attention(q, k, v, -1.0)
    with pytest.raises(ValueError, match="key_bias"):
        gathered_attention(q, k, v, key_bias=torch.zeros(1, 7, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, keys, d", [(37, 100, 64), (1, 77, 128), (300, 300, 128)])
def test_the_attention_op_matches_the_reference(dtype, rows, keys, d):
    """`astraea::sparse_attention` as the graph calls it (gathered query rows, no mask; the Triton
    kernel on a GPU, PyTorch's CPU kernel here): out and the natural-log lse against float64."""
    import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*)

    q, k, v = _qkv(2, 3, keys, keys, d, dtype, seed=rows)
    idx = torch.randperm(keys, generator=torch.Generator().manual_seed(rows))[:rows].to(DEVICE)
    q = _rows(q, idx)
    out, lse = torch.ops.astraea.sparse_attention(q, k, v, scale=0.3)
    ref_out, ref_lse = gathered_attention_reference(q.double(), k.double(), v.double(), 0.3)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[dtype], rtol=0)


@pytest.mark.parametrize("case", ["plain", "key_bias", "per_query_mask", "grouped_heads", "contiguous_queries"])
def test_the_attention_op_lays_out_its_output_as_its_fake_says(case):
    """Compiled code reads the op's output with the strides its fake kernel gives ([B, K, H, d]
    order, so that merging the heads after it is a view): every path must return exactly those."""
    import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*)
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(2, 4, 30, 30, 32, torch.float32, seed=3)
    q = q.contiguous() if case == "contiguous_queries" else _rows(q, torch.arange(0, 30, 3, device=DEVICE))
    if case == "grouped_heads":
        k, v = k[:, :2], v[:, :2]
    mask = {"key_bias": torch.rand(2, 1, 1, 30, device=DEVICE) > 0.2,
            "per_query_mask": torch.rand(2, 4, q.shape[2], 30, device=DEVICE) > 0.2}.get(case)
    if mask is not None:
        mask[..., 0] = True  # every row keeps a key
    out, lse = torch.ops.astraea.sparse_attention(q, k, v, attn_mask=mask)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_mask = None if mask is None else mode.from_tensor(mask)
        fake_out, fake_lse = torch.ops.astraea.sparse_attention(*(mode.from_tensor(t) for t in (q, k, v)),
                                                                attn_mask=fake_mask)
    assert out.shape == fake_out.shape and out.stride() == fake_out.stride()
    assert lse.shape == fake_lse.shape and lse.stride() == fake_lse.stride()


def test_library_ops_compile_to_what_they_compute_eagerly():
    """astraea::sparse_attention and astraea::merge_rows, the ops the rewritten graph calls (and
    that launch these kernels on a GPU), give inside a full-graph compile what they give eagerly."""
    import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*)

    def f(q, k, v, x, rows, idx, cache, change, lse_state):
        out, lse = torch.ops.astraea.sparse_attention(q, k, v)
        y = torch.ops.astraea.merge_rows(x, rows * 2, idx, cache, change, lse, lse_state, None, None, None)
        return out + 1, y

    q, k, v = _qkv(1, 2, 3, 30, 32, torch.float32, seed=8)
    idx = torch.tensor([[3, 1, 29]])
    x, rows, idx, cache, change, _, lse_state = _merge_inputs(1, 30, 40, 2, idx, torch.float32, torch.float32)
    eager_state, compiled_state = ([t.clone() for t in (cache, change, lse_state)] for _ in range(2))
    eager = f(q, k, v, x, rows, idx, *eager_state)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, x, rows, idx, *compiled_state)
    for a, b in zip(eager + tuple(eager_state), compiled + tuple(compiled_state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- merge_rows ----

def _merge_inputs(B, N, D, H, idx, x_dtype, cache_dtype, seed=0):
    """Inputs of merge_rows; idx is [S, K], or [K] for one selection shared by the batch."""
    g = torch.Generator().manual_seed(seed)
    idx = idx[None] if idx.dim() == 1 else idx
    S, K = idx.shape
    x = torch.randn(B, N, D, generator=g)
    rows = torch.randn(B, K, D, generator=g)
    cache = torch.randn(B, N, D, generator=g)
    if cache_dtype == torch.float8_e4m3fn:
        # The interpreter rounds to fp8 wrongly (a carry out of the mantissa can halve the
        # value), so on CPU the contributions rows - x are made exact e4m3 values: x on a
        # 1/4 grid, contributions on a 1/16 grid within +-8, exact in every x dtype. Rounding
        # itself is checked on the GPU. One row past the fp8 range checks the saturation.
        x = (x * 4).round().clamp(-16, 16) / 4
        step = ((torch.randn(B, K, D, generator=g) * 2).clamp(-7.5, 7.5) * 16).round() / 16
        rows = _rows_at(x, idx) + step.to(torch.float8_e4m3fn).float()
        rows[:, :1] = 1024.0
    change, lse_state = torch.rand(S, N, generator=g), torch.randn(S, N, generator=g)
    lse_rows = torch.randn(B, H, K, generator=g)
    return (x.to(DEVICE, x_dtype), rows.to(DEVICE, x_dtype), idx.to(DEVICE), cache.to(DEVICE, cache_dtype),
            change.to(DEVICE), lse_rows.to(DEVICE), lse_state.to(DEVICE))


def _rows_at(t, idx):
    """t[b, idx[b or 0]] for each sample b: [B, K, D] (indexing: CPU has no fp8 gather)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], idx.expand(t.shape[0], -1)]


def _check_merge(x, rows, idx, cache, change, lse_rows, lse_state):
    state = [t.clone() for t in (cache, change, lse_state)]
    ref_state = [t.clone() for t in (cache, change, lse_state)]
    y = merge_rows(x, rows, idx, state[0], state[1], lse_rows, state[2])
    y_ref = merge_rows_reference(x, rows, idx, ref_state[0], ref_state[1], lse_rows, ref_state[2])
    half = x.dtype != torch.float32
    # Selected rows are copies of `rows`, so they must match exactly.
    assert torch.equal(_rows_at(y, idx), rows)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2 if half else 1e-6, rtol=1.6e-2 if half else 1e-6)

    chosen = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, idx.expand(x.shape[0], -1), True)
    scored = chosen[: idx.shape[0]]  # the score rows: per sample, or the batch's one
    assert torch.equal(state[0][~chosen], cache[~chosen])
    for new, old in zip(state[1:], (change, lse_state)):
        assert torch.equal(new[~scored], old[~scored])
    torch.testing.assert_close(state[1], ref_state[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[2], ref_state[2], atol=1e-6, rtol=1e-6)
    if lse_rows is None:
        assert torch.equal(state[2], lse_state)

    new = rows.float() - _rows_at(x, idx).float()
    got = _rows_at(state[0], idx).float()
    if cache.dtype == torch.float8_e4m3fn:
        assert torch.equal(got, new.clamp(-448, 448)) and torch.equal(state[0], ref_state[0])
    elif cache.dtype == torch.float32:
        torch.testing.assert_close(got, new, atol=0, rtol=0)
    else:
        torch.testing.assert_close(got, _rows_at(ref_state[0], idx).float(), atol=1e-2, rtol=1.6e-2)


def _selections(B, N, K, seed):
    """[B, K]: a different random selection for each sample."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)])


@pytest.mark.parametrize("x_dtype, cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.float8_e4m3fn), (torch.float32, torch.float8_e4m3fn),
])
@pytest.mark.parametrize("with_lse", [True, False])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_merge_matches_reference(x_dtype, cache_dtype, with_lse, per_sample):
    idx = _selections(2 if per_sample else 1, 70, 29, seed=9)
    x, rows, idx, cache, change, lse_rows, lse_state = _merge_inputs(2, 70, 96, 3, idx, x_dtype, cache_dtype)
    _check_merge(x, rows, idx, cache, change, lse_rows if with_lse else None, lse_state)


@pytest.mark.parametrize("x_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("forecast", [False, True], ids=["keeping slopes", "forecasting"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_merge_with_slopes_matches_reference_and_the_definition(x_dtype, cache_dtype, forecast, per_sample):
    """Each recomputed row's slope is (new - old) / span, the others' slopes untouched; a
    forecasting merge gives the rows not recomputed x + cache + slope * stale."""
    B, N, D, K = 2, 70, 96, 29
    idx = _selections(B if per_sample else 1, N, K, seed=9)
    x, rows, idx, cache, change, lse_rows, lse_state = _merge_inputs(B, N, D, 3, idx, x_dtype, cache_dtype)
    g = torch.Generator().manual_seed(4)
    S = idx.shape[0]
    slope = torch.randn(B, N, D, generator=g).to(DEVICE, cache_dtype)
    stale = torch.randint(0, 5, (S, N), generator=g, dtype=torch.int32).to(DEVICE)
    span = torch.randint(1, 5, (S, K), generator=g).float().to(DEVICE)
    outs = {}
    for name, merge in (("kernel", merge_rows), ("reference", merge_rows_reference)):
        state = [t.clone() for t in (cache, change, lse_state, slope)]
        y = merge(x, rows, idx, state[0], state[1], lse_rows, state[2], state[3], stale, span, forecast)
        outs[name] = (y, state)
    half = x_dtype != torch.float32
    tol = dict(atol=2e-2, rtol=1.6e-2) if half else dict(atol=1e-5, rtol=1e-5)
    for got, want in zip((outs["kernel"][0], *outs["kernel"][1]), (outs["reference"][0], *outs["reference"][1])):
        torch.testing.assert_close(got.float(), want.float(), **tol)
    y, (new_cache, _, _, new_slope) = outs["reference"]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, idx.expand(B, -1), True)
    assert torch.equal(new_slope[~chosen], slope[~chosen])
    fresh = rows.float() - _rows_at(x, idx).float()
    expected = (fresh - _rows_at(cache, idx).float()) / span.expand(B, -1)[..., None]
    torch.testing.assert_close(_rows_at(new_slope, idx).float(), expected, **tol)
    reused = cache.float() + (slope.float() * stale[..., None].float() if forecast else 0.0)
    torch.testing.assert_close(y.float()[~chosen], (x.float() + reused.to(x_dtype).float())[~chosen], **tol)


def test_the_kernels_compile_for_the_gpu_within_its_shared_memory():
    """Each kernel as its launcher launches it on a GPU, compiled for an H100/H200 (sm_90) by
    Triton's own compiler and ptxas, no GPU needed: the interpreter runs Python, not Triton's
    code generation (the merge's forms that keep slopes and forecast had run only there), and a
    block over the shared memory the GPU has fails only at launch. In a process of its own: the
    interpreter's patches break code generation in the process that uses it."""
    if not gpu_compile.can_compile():
        pytest.skip("this Triton has no CUDA back end with ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.gpu_compile"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    for form in (*gpu_compile.MERGE_FORMS, *gpu_compile.ATTENTION_FORMS):
        assert f"{form}: sm_90 binary of" in done.stdout


def test_merge_keeps_each_samples_scores_apart():
    """Per sample, a token's change and LSE are its own sample's, not the batch's mean."""
    idx = torch.tensor([[0, 1], [1, 2]])
    x, rows, idx, cache, change, lse_rows, lse_state = _merge_inputs(2, 4, 8, 2, idx, torch.float32, torch.float32)
    merge_rows(x, rows, idx, cache, change, lse_rows, lse_state)
    torch.testing.assert_close(lse_state[1, 1:3], lse_rows[1].mean(0))
    torch.testing.assert_close(lse_state[0, :2], lse_rows[0].mean(0))


@pytest.mark.parametrize("N, D, idx", [
    (50, 600, torch.tensor([49, 0, 17])),   # D spans two column chunks, the second partial
    (33, 40, torch.arange(33).flip(0)),     # every token selected
    (33, 40, torch.tensor([32])),           # one token
    (33, 40, torch.tensor([], dtype=torch.int64)),  # none: everything from the cache
    (33, 40, torch.tensor([[32], [0]])),    # one token, a different one per sample
])
def test_merge_shapes(N, D, idx):
    _check_merge(*_merge_inputs(2, N, D, 4, idx, torch.float32, torch.float32, seed=N))


def test_merge_writes_every_row(monkeypatch):
    _poisoned_allocations(monkeypatch)
    inputs = _merge_inputs(1, 41, 72, 2, torch.tensor([40, 3, 8]), torch.bfloat16, torch.bfloat16)
    state = [t.clone() for t in inputs[3:]]
    y = merge_rows(*inputs[:3], state[0], state[1], inputs[5], state[3])
    assert not y.isnan().any()
    _check_merge(*inputs)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 60), D=st.integers(1, 150), frac=st.floats(0.0, 1.0),
       per_sample=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_property(B, N, D, frac, per_sample, seed):
    idx = _selections(B if per_sample else 1, N, round(frac * N), seed)
    _check_merge(*_merge_inputs(B, N, D, 2, idx, torch.float32, torch.float32, seed=seed))


def test_merge_rejects_bad_inputs():
    x, rows, idx, cache, change, lse_rows, lse_state = _merge_inputs(
        1, 10, 8, 2, torch.tensor([1, 2]), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="rows"):
        merge_rows(x, rows[:, :1], idx, cache, change, lse_rows, lse_state)
    with pytest.raises(TypeError, match="rows dtype"):
        merge_rows(x, rows.half(), idx, cache, change, lse_rows, lse_state)
    with pytest.raises(ValueError, match="contiguous"):
        merge_rows(x.transpose(1, 2).contiguous().transpose(1, 2), rows, idx, cache, change, lse_rows, lse_state)
    with pytest.raises(TypeError, match="cache dtype"):
        merge_rows(x, rows, idx, cache.int(), change, lse_rows, lse_state)
    with pytest.raises(ValueError, match="lse_rows"):
        merge_rows(x, rows, idx, cache, change, lse_rows[:, :, :1], lse_state)
    with pytest.raises(TypeError, match="change"):
        merge_rows(x, rows, idx, cache, change.double(), lse_rows, lse_state)
    with pytest.raises(TypeError, match=r"idx must be a \[1 or B=1, K\]"):
        merge_rows(x, rows, idx[0], cache, change, lse_rows, lse_state)
    with pytest.raises(ValueError, match="change and lse_state must be"):
        merge_rows(x, rows, idx, cache, change[0], lse_rows, lse_state)


def test_merge_op_fake_matches_real_on_strided_inputs():
    """The block input may reach merge_rows transposed (HunyuanVideo's single-stream block):
    the op's fake must give the strides the real op returns, or Inductor's stride asserts fail."""
    import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*)
    B, N, D, K = 1, 8, 4, 3
    x = torch.randn(B, D, N).transpose(1, 2)  # [B, N, D], not contiguous
    idx = torch.tensor([[0, 3, 5]])
    args = (x, torch.randn(B, K, D), idx, torch.zeros(B, N, D), torch.zeros(1, N), torch.randn(B, 2, K), torch.zeros(1, N),
            None, None, None)
    torch.library.opcheck(torch.ops.astraea.merge_rows, args, test_utils=("test_faketensor", "test_schema"))
    assert torch.ops.astraea.merge_rows(*args).is_contiguous()


@pytest.mark.parametrize("batch_bias", [1, 2])
def test_attention_key_bias(batch_bias):
    """A key-padding mask as an additive bias (the text padding of joint attention): masked
    keys get no weight, and the kernel matches the reference with the bias, ragged tail included."""
    q, k, v = _qkv(2, 2, 5, 45, 32, torch.float32)
    bias = torch.zeros(batch_bias, 45, device=DEVICE)
    bias[:, 40:] = float("-inf")
    bias[-1, :3] = -1.5
    idx = torch.tensor([0, 2, 4], device=DEVICE)
    q = _rows(q, idx)
    out, lse = gathered_attention(q, k, v, key_bias=bias)
    ref_out, ref_lse = gathered_attention_reference(q.double(), k.double(), v.double(), key_bias=bias.double())
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    dropped, _ = gathered_attention_reference(q.double(), k[:, :, :40].double(), v[:, :, :40].double(),
                                              key_bias=bias[:, :40].double())
    torch.testing.assert_close(ref_out, dropped)  # -inf keys are as good as absent


def test_every_argument_an_op_writes_is_required():
    """torch 2.11's ADInplaceOrView kernel of a custom op finds the arguments it writes by position
    among those passed; a call leaving one to its default drops it on the way to Python and fails
    there ("tuple index out of range", the whole backend with it). torch 2.13 fills defaults in
    first, so only the schema shows the hazard on this machine."""
    import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*)

    for name in torch.ops.astraea:
        for overload in getattr(torch.ops.astraea, name).overloads():
            schema = getattr(getattr(torch.ops.astraea, name), overload)._schema
            written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            defaulted = [a.name for a in schema.arguments if a.name in written and a.has_default_value()]
            assert not defaulted, f"astraea::{name} writes {defaulted}, which have defaults"


@pytest.mark.parametrize("shape", [(1, 1, 12, 5), (2, 3, 4, 24), (1, 2, 3, 32)])
def test_a_per_query_mask_is_laid_out_as_the_memory_efficient_kernel_takes_it(shape):
    """`astraea::sparse_attention` on a GPU hands a mask that differs between queries to PyTorch's
    memory-efficient kernel, which refuses a bias whose rows do not start at multiples of 16
    elements (SDPA pads one before calling it; the op calls the kernel directly)."""
    from astraea.ops.sparse import _aligned_rows

    bias = torch.randn(shape)
    aligned = _aligned_rows(bias)
    torch.testing.assert_close(aligned, bias, rtol=0, atol=0)
    assert aligned.stride(-1) == 1 and all(s % 16 == 0 for s in aligned.stride()[:-1])
