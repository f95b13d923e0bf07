"""Forward time, FLOPs and memory of astraea against dense, on the Wan2.1-1.3B shape.

Random bf16 weights, 81 frames at 480x832 (latent 16x21x60x104 = 32,760 tokens), 512 text
tokens. One run measures dense eager, dense Inductor and astraea at several budgets (one
compiled model serves all of them), the FLOP ratio of each budget next to its time ratio,
peak memory and cache bytes, and what an fp8 cache costs in fidelity. Writes JSON, a
markdown table and a PNG of time against budget with the ideal line r x dense.

    python benchmarks/forward.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from diffusers import WanTransformer3DModel
import astraea
from astraea.flops import count_flops, counting

BUDGETS = (1.0, 0.75, 0.5, 0.4, 0.25)


def wan13b(layers: int) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).to("cuda", torch.bfloat16).eval()


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def flop_ratios(model, call) -> dict:
    """FLOPs of a forward at each budget over the dense forward's, counted on the eager rewrite
    so that the counter sees every op (Inductor's generated kernels bypass it)."""
    dense, _ = count_flops(call, model, 999.0)
    ratios = {}
    torch._dynamo.reset()
    for budget in BUDGETS:
        be = astraea.backend(schedule=[1.0, budget], lowering="eager")
        counted = torch.compile(model, backend=be)
        call(counted, 1000.0)
        flops = []
        be.runners[0].graph_fn = counting(be.runners[0].graph_fn, flops)
        call(counted, 990.0)
        ratios[budget] = flops[0] / dense
        torch._dynamo.reset()
    return ratios


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--flops-only", action="store_true",
                        help="only count FLOPs, into the forward.json already in --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = wan13b(args.layers)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, args.frames, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    call = lambda m, t: m(hidden_states=x, timestep=torch.tensor([t], device="cuda"), encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "tokens": args.frames * 30 * 52, "budgets": {}}

    if args.flops_only:
        with open(os.path.join(args.out, "forward.json")) as f:
            result = json.load(f)
        with torch.no_grad():
            for budget, ratio in flop_ratios(model, call).items():
                result["budgets"][str(budget)]["flop_ratio"] = ratio
        write(result, args.out)
        return
    with torch.no_grad():
        reference = call(model, 999.0)
        result["dense_eager_ms"] = statistics.median(timed(lambda: call(model, 999.0), args.reps))
        inductor = torch.compile(model)
        t0 = time.perf_counter()
        dense_out = call(inductor, 999.0)
        torch.cuda.synchronize()
        result["dense_inductor_compile_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        result["dense_inductor_ms"] = statistics.median(timed(lambda: call(inductor, 999.0), args.reps))
        result["dense_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["dense_inductor_vs_eager_rel_l2"] = rel_l2(dense_out, reference)

        # astraea: one compiled model, the schedule walks through every budget.
        per = args.warmup + args.reps
        schedule = [1.0] + [b for b in BUDGETS for _ in range(per)]
        be = astraea.backend(schedule=schedule)
        sparse = torch.compile(model, backend=be)
        t0 = time.perf_counter()
        first = call(sparse, 1000.0)
        torch.cuda.synchronize()
        result["astraea_compile_s"] = time.perf_counter() - t0
        result["astraea_budget1_vs_eager_rel_l2"] = rel_l2(first, reference)
        runner = be.runners[0]
        torch.cuda.reset_peak_memory_stats()
        step = 1
        for budget in BUDGETS:
            times = []
            for i in range(per):
                t = 999.0 - step
                step += 1
                ms = timed(lambda: call(sparse, t), 1)[0]
                if i >= args.warmup:
                    times.append(ms)
            result["budgets"][str(budget)] = {"ms": statistics.median(times)}
        result["astraea_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["cache_gb_per_context"] = runner.cache_bytes() / 2**30
        assert [r.budget for r in runner.records] == schedule

        for budget, ratio in flop_ratios(model, call).items():
            result["budgets"][str(budget)]["flop_ratio"] = ratio

        # What an fp8 cache costs: same drifting inputs, compared with dense and with a bf16 cache.
        fidelity = {}
        for dtype in ("auto", "float8_e4m3fn"):
            be = astraea.backend(schedule=[1.0] + [0.5] * 5, cache_dtype=dtype, lowering="eager")
            m = torch.compile(model, backend=be)
            drift = torch.Generator(device="cuda").manual_seed(1)
            xs = x.clone()
            for s in range(6):
                xs += 0.05 * torch.randn(xs.shape, device="cuda", dtype=xs.dtype, generator=drift)
                t = torch.tensor([1000.0 - s], device="cuda")
                out = m(hidden_states=xs, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                dense = model(hidden_states=xs, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            fidelity[dtype] = {"rel_l2_vs_dense": rel_l2(out, dense), "cache_gb": be.runners[0].cache_bytes() / 2**30}
            torch._dynamo.reset()
        result["cache_dtype_fidelity"] = fidelity

    dense_ms = result["dense_inductor_ms"]
    for b, row in result["budgets"].items():
        row["ratio_to_dense_inductor"] = row["ms"] / dense_ms
        row["target"] = 1.05 if float(b) == 1.0 else float(b) + 0.07
    write(result, args.out)


def write(result: dict, out: str) -> None:
    with open(os.path.join(out, "forward.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"Wan2.1-1.3B shape, {result['layers']} layers, {result['tokens']} tokens, bf16, {result['device']}, torch {result['torch']}",
        "",
        f"dense eager {result['dense_eager_ms']:.1f} ms; dense Inductor {result['dense_inductor_ms']:.1f} ms "
        f"(compile {result['dense_inductor_compile_s']:.0f} s); astraea compile {result['astraea_compile_s']:.0f} s",
        "",
        "| budget | ms | time / dense Inductor | target | FLOPs / dense |",
        "|---|---|---|---|---|",
    ]
    for b, row in result["budgets"].items():
        lines.append(f"| {b} | {row['ms']:.1f} | {row['ratio_to_dense_inductor']:.3f} | {row['target']:.2f} | {row['flop_ratio']:.3f} |")
    lines += ["", f"peak memory: dense {result['dense_peak_gb']:.1f} GB, astraea {result['astraea_peak_gb']:.1f} GB; "
              f"cache {result['cache_gb_per_context']:.2f} GB per context"]
    for dtype, row in result["cache_dtype_fidelity"].items():
        lines.append(f"cache {dtype}: {row['cache_gb']:.2f} GB, rel. L2 vs dense after 5 steps at 0.5: {row['rel_l2_vs_dense']:.4f}")
    with open(os.path.join(out, "forward.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [float(b) for b in result["budgets"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(budgets, [r["ms"] for r in result["budgets"].values()], "o-", label="astraea")
    ax.plot([0, 1], [0, result["dense_inductor_ms"]], "--", label="ideal: r x dense Inductor")
    ax.axhline(result["dense_inductor_ms"], color="gray", lw=0.8, label="dense Inductor")
    ax.set_xlabel("budget (fraction of tokens recomputed)")
    ax.set_ylabel("ms per forward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "forward.png"), dpi=120)


if __name__ == "__main__":
    main()
