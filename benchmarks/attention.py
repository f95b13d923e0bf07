"""Check the kernels on the GPU, then time them at Wan-1.3B 480p shapes.

gathered_attention is timed the way the rewritten graph calls it (the K selected query rows
gathered from the [B, N, H, d] projection, so a permuted [B, H, K, d] view; keys and values as
permuted views of all N) against F.scaled_dot_product_attention on contiguous copies of the
same tensors: the ideal a query-sparse block can hope for is time linear in K. Beside it,
PyTorch's cuDNN and FlashAttention kernels returning the log-sum-exp, on the same views, and
`astraea::sparse_attention` itself (cuDNN where it takes the inputs), also each followed by what
the graph does next, merging each row's heads (a view in the order both write). merge_rows is
timed as bytes moved per second, with one selection for the batch ([1, K] indices).

    PYTHONPATH=. python benchmarks/attention.py --out benchmarks/results/attention.json
"""
import argparse
import json
import platform

import torch
import torch.nn.functional as F
import triton

import astraea.ops  # noqa: F401  (registers torch.ops.astraea.*, which check_compiled calls)
from astraea.kernels import gathered_attention, gathered_attention_reference, merge_rows, merge_rows_reference
from astraea.kernels.gathered_attention import tiles


def median_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def back_to_back_ms(fn, calls=20, warmup=3) -> float:
    """Mean ms of `calls` calls queued back to back, as a model queues them: the host's time to
    launch one hides behind the GPU's work on the one before."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def optional_ms(fn) -> float:
    """median_ms, or NaN (saying why) where the kernel refuses the inputs."""
    try:
        return median_ms(fn)
    except RuntimeError as e:
        print(f"not timed: {str(e)[:200]}", flush=True)
        return float("nan")


def qkv(B, N, H, d, dtype=torch.bfloat16):
    """The model's layout: one [B, N, 3, H, d] projection, viewed per tensor as [B, H, N, d]."""
    x = torch.randn(B, N, 3, H, d, device="cuda", dtype=dtype)
    return [x[:, :, i].transpose(1, 2) for i in range(3)]


def gathered_rows(q, idx):
    """The rows idx of q [B, H, N, d] as the graph gathers them: from q's [B, N, H, d] storage."""
    return q.transpose(1, 2)[:, idx].transpose(1, 2)


def check_attention(B, N, H, d, K, rows_checked=1024):
    q, k, v = qkv(B, N, H, d)
    q_rows = gathered_rows(q, torch.randperm(N, device="cuda")[:K])
    out, lse = gathered_attention(q_rows, k, v)
    sub = torch.arange(min(rows_checked, K), device="cuda")
    ref_out, ref_lse = gathered_attention_reference(q_rows[:, :, sub], k, v)
    err = (out[:, :, sub].float() - ref_out.float()).abs().max().item()
    lse_err = (lse[:, :, sub] - ref_lse).abs().max().item()
    assert err < 2e-2 and lse_err < 1e-3, (N, K, err, lse_err)
    return {"N": N, "K": K, "d": d, "max_abs_err": err, "lse_max_abs_err": lse_err}


def check_misaligned():
    # A view one element into its storage cannot use TMA: this runs the pointer path.
    wide = torch.randn(1, 4, 1000, 129, device="cuda", dtype=torch.bfloat16)
    q, k, v = wide[..., 1:], wide.flip(2)[..., 1:], wide.flip(1)[..., 1:]
    q = q[:, :, torch.randperm(1000, device="cuda")[:333]]
    out, lse = gathered_attention(q, k, v)
    ref_out, ref_lse = gathered_attention_reference(q, k, v)
    err = (out.float() - ref_out.float()).abs().max().item()
    assert err < 2e-2 and (lse - ref_lse).abs().max().item() < 1e-3, err
    return {"pointer_path_max_abs_err": err}


def merge_inputs(B, N, D, H, K, cache_dtype):
    """merge_rows' inputs with one selection for the batch: idx [1, K], scores [1, N]."""
    idx = torch.randperm(N, device="cuda")[:K][None]
    x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16)
    fresh = torch.randn(B, K, D, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(B, N, D, device="cuda").to(cache_dtype)
    return (x, fresh, idx, cache, torch.rand(1, N, device="cuda"), torch.randn(B, H, K, device="cuda"),
            torch.randn(1, N, device="cuda"))


def check_merge(cache_dtype):
    x, fresh, idx, cache, change, lse_rows, lse_state = merge_inputs(2, 3000, 640, 12, 1234, cache_dtype)
    ours = [t.clone() for t in (cache, change, lse_state)]
    ref = [t.clone() for t in (cache, change, lse_state)]
    y = merge_rows(x, fresh, idx, ours[0], ours[1], lse_rows, ours[2])
    y_ref = merge_rows_reference(x, fresh, idx, ref[0], ref[1], lse_rows, ref[2])
    assert torch.equal(y, y_ref) and torch.equal(ours[0], ref[0]), cache_dtype
    torch.testing.assert_close(ours[1], ref[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours[2], ref[2], atol=1e-6, rtol=1e-6)
    return str(cache_dtype)


def check_compiled():
    """The library's ops (which launch these kernels) inside an Inductor graph give the eager results."""
    def f(q, k, v, x, fresh, idx, cache, change, lse_state):
        out, lse = torch.ops.astraea.sparse_attention(q, k, v)
        y = torch.ops.astraea.merge_rows(x, fresh * 2, idx, cache, change, lse, lse_state, None, None, None)
        return out + 1, y

    x, fresh, idx, cache, change, _, lse_state = merge_inputs(1, 999, 256, 4, 300, torch.bfloat16)
    q, k, v = qkv(1, 999, 4, 64)
    q = gathered_rows(q, idx[0])
    eager_state = [t.clone() for t in (cache, change, lse_state)]
    compiled_state = [t.clone() for t in (cache, change, lse_state)]
    eager = f(q, k, v, x, fresh, idx, *eager_state)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, x, fresh, idx, *compiled_state)
    same = all(torch.equal(a, b) for a, b in zip(eager + tuple(eager_state), compiled + tuple(compiled_state)))
    assert same, "compiled ops differ from eager"
    return same


def time_attention(N, H, d, ratios):
    q, k, v = qkv(1, N, H, d)
    rows = []
    for r in ratios:
        K = round(r * N)
        q_view = gathered_rows(q, torch.randperm(N, device="cuda")[:K])
        q_rows, k_c, v_c = q_view.contiguous(), k.contiguous(), v.contiguous()
        flops = 4 * H * K * N * d
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(q_rows, k_c, v_c))
        ours = median_ms(lambda: gathered_attention(q_view, k, v))
        ours_dense = median_ms(lambda: gathered_attention(q_rows, k_c, v_c))
        # PyTorch's fused kernels with their log-sum-exp, on the views as the op receives them, and the op itself
        cudnn = optional_ms(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q_view, k, v, None, True))
        flash = optional_ms(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q_view, k, v))
        op = median_ms(lambda: torch.ops.astraea.sparse_attention(q_view, k, v))
        # as the graph uses each: the rows' heads merged for the output projection next
        merged = lambda out: out.transpose(1, 2).reshape(1, K, H * d)  # noqa: E731
        op_merged = back_to_back_ms(lambda: merged(torch.ops.astraea.sparse_attention(q_view, k, v)[0]))
        ours_merged = back_to_back_ms(lambda: merged(gathered_attention(q_view, k, v)[0]))
        rows.append({"K_over_N": r, "K": K, "sdpa_ms": sdpa, "ours_ms": ours, "ours_contiguous_ms": ours_dense,
                     "cudnn_lse_ms": cudnn, "flash_lse_ms": flash, "op_ms": op, "op_heads_merged_ms": op_merged,
                     "ours_heads_merged_ms": ours_merged,
                     "sdpa_tflops": flops / sdpa / 1e9, "ours_tflops": flops / ours / 1e9,
                     "ours_over_sdpa": sdpa / ours})
        print(f"K/N {r:4.2f}  SDPA {sdpa:7.3f} ms {flops / sdpa / 1e9:5.0f} TFLOP/s | ours {ours:7.3f} ms "
              f"{flops / ours / 1e9:5.0f} TFLOP/s (contiguous q: {ours_dense:.3f} ms) | ours/SDPA {sdpa / ours:.3f} | "
              f"cuDNN+lse {cudnn:.3f} ms, flash+lse {flash:.3f} ms, the op {op:.3f} ms; heads merged after: "
              f"the op {op_merged:.3f} ms, ours {ours_merged:.3f} ms", flush=True)
    return rows


def time_merge(N, D, H, ratio, cache_dtype):
    K = round(ratio * N)
    x, fresh, idx, cache, change, lse_rows, lse_state = merge_inputs(1, N, D, H, K, cache_dtype)
    call = lambda: merge_rows(x, fresh, idx, cache, change, lse_rows, lse_state)
    # x, cache and y over all rows; the fresh rows and the cache write over the K selected.
    moved = N * D * (2 * x.element_size() + cache.element_size()) + K * D * (fresh.element_size() + cache.element_size())
    eager = median_ms(lambda: [call() for _ in range(20)]) / 20
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    replay = median_ms(graph.replay)
    result = {"N": N, "D": D, "K": K, "cache_dtype": str(cache_dtype), "bytes": moved,
              "eager_us": eager * 1e3, "eager_GBps": moved / eager / 1e6,
              "graph_us": replay * 1e3, "graph_GBps": moved / replay / 1e6}
    print(f"merge_rows N={N} D={D} K={K} cache {cache_dtype}: eager {eager * 1e3:.1f} us "
          f"({moved / eager / 1e6:.0f} GB/s), graph replay {replay * 1e3:.1f} us ({moved / replay / 1e6:.0f} GB/s)",
          flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--tokens", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.4, 0.25])
    parser.add_argument("--width", type=int, default=1536, help="hidden size D for merge_rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA device")
    torch.manual_seed(0)
    N, H, d = args.tokens, args.heads, args.head_dim

    checks = {"attention": [check_attention(1, N, H, d, N // 2), check_attention(2, 1000, 3, 64, 1000),
                            check_attention(1, 777, 2, 128, 1)],
              "pointer_path": check_misaligned(),
              "merge": [check_merge(dt) for dt in (torch.bfloat16, torch.float32, torch.float8_e4m3fn)]}
    print("checks passed:", json.dumps(checks), flush=True)

    attention = time_attention(N, H, d, args.ratios)
    merge = [time_merge(N, args.width, H, 0.5, dt) for dt in (torch.bfloat16, torch.float8_e4m3fn)]
    used = tiles(torch.bfloat16, use_tma=True)  # contiguous bf16 inputs on a Hopper GPU take the TMA path
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "shape": {"B": 1, "N": N, "H": H, "d": d, "dtype": "bfloat16"},
              "attention_config": str(used), "checks": checks, "attention": attention, "merge_rows": merge}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    # Last, since it compiles the longest: the figures above are saved even if it fails.
    try:
        checks["compiled_ops_match_eager"] = check_compiled()
    except Exception as e:  # reported, not fatal: the eager figures stand on their own
        checks["compiled_ops_match_eager"] = f"{type(e).__name__}: {str(e)[:500]}"
    print("compiled ops:", checks["compiled_ops_match_eager"], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{'K/N':>5} {'SDPA ms':>8} {'ours ms':>8} {'SDPA TF/s':>10} {'ours TF/s':>10} {'ours/SDPA':>9} "
          f"{'cuDNN ms':>9} {'flash ms':>9} {'op ms':>8}")
    for row in attention:
        print(f"{row['K_over_N']:5.2f} {row['sdpa_ms']:8.3f} {row['ours_ms']:8.3f} {row['sdpa_tflops']:10.0f} "
              f"{row['ours_tflops']:10.0f} {row['ours_over_sdpa']:9.3f} {row['cudnn_lse_ms']:9.3f} "
              f"{row['flash_lse_ms']:9.3f} {row['op_ms']:8.3f}")
    print(f"attention config: {used}; wrote {args.out}")


if __name__ == "__main__":
    main()
