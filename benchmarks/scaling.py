"""Denoising-step time on 1, 2 or 4 GPUs: dense (diffusers' context parallelism alone) and
astraea at budgets 0.5 and 0.4, on the Wan2.1-1.3B shape (81 frames, 480x832, 32,760 tokens).

One invocation measures one parallel layout; `--report` merges the layouts measured so far.

    torchrun --nproc-per-node 1 benchmarks/scaling.py
    torchrun --nproc-per-node 2 benchmarks/scaling.py --ulysses 2
    torchrun --nproc-per-node 2 benchmarks/scaling.py --cfg 2          # one CFG branch per GPU
    python benchmarks/scaling.py --report

A step is classifier-free guidance: two forwards (in turn, or one per half of the ranks
with --cfg 2). Besides step times it records what the Ulysses all-to-alls of one forward
cost on their own, at each budget, to show where multi-GPU time goes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import astraea
import astraea.parallel
from astraea.runtime.select import num_selected
from astraea.ops.ulysses import exchange
from forward import timed, wan13b

BUDGETS = (0.5, 0.4)
HEADS, HEAD_DIM = 12, 128


def step_time(model, x, text, uncond, mesh, t: float, outputs: list | None = None) -> float:
    def predict(context):
        return model(hidden_states=x, timestep=torch.tensor([t], device="cuda"), encoder_hidden_states=context,
                     return_dict=False)[0]

    def step():
        out = astraea.parallel.guidance(predict, text, uncond, 5.0, mesh)
        if outputs is not None:
            outputs.append(out)

    return timed(step, 1)[0]


def exchange_ms(tokens_local: int, rows: int, layers: int, group, reps: int = 5) -> float:
    """All-to-all time of one forward: per block keys, values and query rows out, rows and LSE back."""
    size = group.size()
    kv = torch.randn(1, HEADS, tokens_local, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = kv[:, :, :rows].contiguous()
    out = torch.randn(1, HEADS // size, rows * size, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lse = torch.randn(1, HEADS // size, rows * size, device="cuda")

    def forward_exchanges():
        for _ in range(layers):
            for t in (kv, kv, q):
                exchange(t, group, 1, 2)
            for t in (out, lse):
                exchange(t, group, 2, 1)

    forward_exchanges()
    return statistics.median(timed(forward_exchanges, reps))


def measure_dense(result: dict, layout, x, text, uncond, args) -> torch.Tensor:
    """Records the dense step's compile and median time; returns its first output."""
    model, mesh = layout()
    dense = torch.compile(model)
    t0 = time.perf_counter()
    dense_out = []
    step_time(dense, x, text, uncond, mesh, 1000.0, dense_out)
    result["dense_compile_s"] = time.perf_counter() - t0
    times = [step_time(dense, x, text, uncond, mesh, 999.0) for _ in range(args.warmup + args.reps)]
    result["dense_step_ms"] = statistics.median(times[args.warmup:])
    del dense, model
    torch._dynamo.reset()
    return dense_out[0]


def measure(args) -> dict:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, args.frames, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    uncond = torch.zeros_like(text)
    tokens = args.frames * 30 * 52
    result = {"gpus": world, "ulysses": args.ulysses, "cfg": args.cfg, "layers": args.layers, "tokens": tokens,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "budgets": {}}

    def layout():
        torch.manual_seed(0)  # the same weights for the dense and the astraea model
        model = wan13b(args.layers)
        mesh = astraea.parallel.enable(model, ulysses=args.ulysses, cfg=args.cfg) if world > 1 else None
        return model, mesh

    with torch.no_grad():
        dense_output = None if args.no_dense else measure_dense(result, layout, x, text, uncond, args)
        model, mesh = layout()
        per = args.warmup + args.reps
        schedule = [1.0] + [b for b in BUDGETS for _ in range(per)]
        be = astraea.backend(schedule=schedule)
        sparse = torch.compile(model, backend=be)
        t0 = time.perf_counter()
        first = []
        step_time(sparse, x, text, uncond, mesh, 1000.0, first)
        result["astraea_compile_s"] = time.perf_counter() - t0
        if dense_output is not None:
            a, b = first[0].float(), dense_output.float()
            result["astraea_budget1_vs_dense_rel_l2"] = float((a - b).norm() / b.norm())  # the first step is dense
        result["sparse_blocks"] = be.reports[0].num_sparse_blocks
        step = 1
        for budget in BUDGETS:
            times = [step_time(sparse, x, text, uncond, mesh, 999.0 - step - i) for i in range(per)]
            step += per
            result["budgets"][str(budget)] = {"step_ms": statistics.median(times[args.warmup:])}
        runner = be.runners[0]
        result["tokens_per_rank"] = runner.num_tokens
        result["cache_gb_per_rank"] = runner.cache_bytes() / 2**30
        result["peak_gb_per_rank"] = torch.cuda.max_memory_allocated() / 2**30

        if args.ulysses > 1:
            group = mesh["ulysses"].get_group()
            local = tokens // args.ulysses
            result["exchange_ms_per_forward"] = {
                str(b): exchange_ms(local, num_selected(b, local), args.layers, group) for b in (1.0, *BUDGETS)
            }
    dist.destroy_process_group()
    return result if rank == 0 else None


def name_of(result: dict) -> str:
    return f"{result['gpus']}gpu_u{result['ulysses']}_cfg{result['cfg']}"


def report(out: str) -> None:
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "scaling_*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[name_of(r)] = r
    one = runs.get("1gpu_u1_cfg1")
    if one is None:
        raise SystemExit("no 1-GPU run in " + out)
    dense1, sparse1 = one["dense_step_ms"], one["budgets"]["0.4"]["step_ms"]
    lines = [
        f"Wan2.1-1.3B shape, {one['layers']} layers, {one['tokens']} tokens, bf16, {one['device']}, torch {one['torch']}; "
        "one step = classifier-free guidance (two forwards); speedups over dense Inductor on 1 GPU",
        "",
        "| GPUs | layout | dense ms | astraea 0.5 ms | astraea 0.4 ms | dense speedup | astraea 0.4 speedup "
        "| astraea 0.4 over astraea 0.4 on 1 GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in sorted(runs.items(), key=lambda kv: (kv[1]["gpus"], kv[0])):
        b5, b4 = r["budgets"]["0.5"]["step_ms"], r["budgets"]["0.4"]["step_ms"]
        dense = r.get("dense_step_ms")
        dense_cells = f"{dense:.0f} | " if dense else "not run | "
        lines.append(
            f"| {r['gpus']} | Ulysses {r['ulysses']} x CFG {r['cfg']} | {dense_cells}{b5:.0f} | {b4:.0f} | "
            + (f"{dense1 / dense:.2f}x" if dense else "-")
            + f" | {dense1 / b4:.2f}x | {sparse1 / b4:.2f}x |"
        )
    lines += ["", "Ulysses all-to-alls of one forward on their own (ms), by budget:"]
    for key, r in runs.items():
        if "exchange_ms_per_forward" in r:
            parts = ", ".join(f"{b}: {ms:.1f}" for b, ms in r["exchange_ms_per_forward"].items())
            lines.append(f"- {key}: {parts}")
    lines += ["", "Targets (2 GPUs, budget 0.4): astraea >= 1.9x astraea on 1 GPU; >= 3.8x dense on 1 GPU."]
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--cfg", type=int, default=1, choices=(1, 2))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames -> 21)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-dense", action="store_true", help="astraea only (dense measured in another run)")
    parser.add_argument("--report", action="store_true", help="merge the measured layouts into scaling.md")
    args = parser.parse_args()
    if args.report:
        report(args.out)
        return
    result = measure(args)
    if result is not None:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"scaling_{name_of(result)}.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
