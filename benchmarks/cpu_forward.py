"""Does wall time fall with the budget on a CPU too? Forward time and FLOPs of a mid-sized Wan.

CPU runs the rewritten graph eagerly (no Triton, no Inductor), so this measures the rewrite
itself: gathers and merges against the work saved. Writes JSON and a markdown table.

    python benchmarks/cpu_forward.py --out benchmarks/results
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=64, ffn_dim=1024, num_layers=args.layers, cross_attn_norm=True, rope_max_seq_len=256,
    ).eval()
    x, text = torch.randn(1, 16, 4, 32, 64), torch.randn(1, 64, 256)  # 4 x 16 x 32 = 2,048 tokens
    call = lambda m, t: m(hidden_states=x, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)[0]  # noqa: E731

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    result = {"tokens": 2048, "layers": args.layers, "threads": torch.get_num_threads(), "budgets": {}}
    with torch.no_grad():
        call(model, 999.0)
        dense_flops, _ = count_flops(call, model, 999.0)
        schedule = [1.0] + [b for b in BUDGETS for _ in range(args.reps + 1)]
        be = astraea.backend(schedule=schedule)
        sparse = torch.compile(model, backend=be)
        call(sparse, 1000.0)
        runner, step, dense_times = be.runners[0], 1, []
        for budget in BUDGETS:
            graph, flops = runner.graph_fn, []
            runner.graph_fn = counting(graph, flops)
            call(sparse, 999.0 - step)  # warm-up at this budget, counted
            runner.graph_fn = graph
            step += 1
            times = []
            for _ in range(args.reps):  # dense and sparse interleaved: both see the same machine load
                dense_times.append(timed(lambda: call(model, 999.0)))
                times.append(timed(lambda: call(sparse, 999.0 - step)))
                step += 1
            result["budgets"][str(budget)] = {"ms": statistics.median(times), "flop_ratio": flops[0] / dense_flops}
        result["dense_ms"] = statistics.median(dense_times)
        for row in result["budgets"].values():
            row["time_ratio"] = row["ms"] / result["dense_ms"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_forward.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"CPU, {result['threads']} threads, Wan-like {args.layers} layers, 2,048 tokens, fp32, eager rewrite; "
             f"dense {result['dense_ms']:.1f} ms", "", "| budget | ms | time / dense | FLOPs / dense |", "|---|---|---|---|"]
    lines += [f"| {b} | {r['ms']:.1f} | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} |" for b, r in result["budgets"].items()]
    with open(os.path.join(args.out, "cpu_forward.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
