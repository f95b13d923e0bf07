"""Where a generation's time goes when the GPU outruns Python, and what CUDA graphs save.

One compile serves both settings (`cuda_graphs` is read per call). For each setting and
schedule, a generation is timed end to end next to the sum of its calls as CUDA events see
them (what a cost table records), the host time spent inside the calls, and the rest: the
sampler between calls. The final latents of the two settings must be equal. Last, the host
ops that cost most in one uncaptured generation (torch.profiler). Writes JSON and markdown.

    python benchmarks/call_overhead.py --model wan2.1-1.3b --frames 5 --height 60 --width 104 \\
        --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from astraea.search import models
from astraea.search.sparse import SparseModel
from astraea.search.timing import CallTimer, wall_ms

SEED = 7


class HostTimer(CallTimer):
    """A CallTimer that also keeps the host seconds each call took to return."""

    def __init__(self, transformer, device):
        super().__init__(transformer, device)
        self.host: list[float] = []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = super().__call__(*args, **kwargs)
        self.host.append(time.perf_counter() - start)
        return out


def measure(workload, sparse: SparseModel, budgets: list[float]) -> tuple[dict, torch.Tensor]:
    timer = HostTimer(sparse.module, workload.device)
    sparse.set_schedule(budgets)
    for _ in range(2):  # compiles, autotunes and captures
        workload.generate(timer, SEED)
    timer.take(), timer.host.clear()
    latent = []
    wall = wall_ms(lambda: latent.append(workload.generate(timer, SEED).latent), workload.device, repeats=1, warmup=0)
    calls = sum(timer.take())
    row = {"wall_ms": wall, "calls_ms": calls, "host_in_calls_ms": 1e3 * sum(timer.host),
           "between_calls_ms": wall - calls, "per_call_gap_ms": (wall - calls) / len(timer.host)}
    return row, latent[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models.add_arguments(parser)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    workload = models.from_arguments(args)
    sparse = SparseModel(workload)
    steps = workload.num_steps
    schedules = {f"uniform {b:g}" if b < 1 else "dense": [1.0] + [b] * (steps - 1) for b in (1.0, 0.5, 0.1)}
    rows, latents = {}, {}
    for graphs in (False, True):
        sparse.backend.update(cuda_graphs=graphs)
        for name, budgets in schedules.items():
            label = f"{name}, {'CUDA graphs' if graphs else 'launched'}"
            rows[label], latents[label] = measure(workload, sparse, budgets)
            print(label, {k: round(v, 2) for k, v in rows[label].items()}, flush=True)
    for name in schedules:
        a, b = latents[f"{name}, CUDA graphs"], latents[f"{name}, launched"]
        rows[f"{name}, CUDA graphs"]["max_abs_diff_vs_launched"] = float((a - b).abs().max())
    graphs = sparse.backend.runners[0].call_graphs
    counts = {"captures": graphs.captures, "replays": graphs.replays} if graphs else {}

    sparse.backend.update(cuda_graphs=False)
    sparse.set_schedule(schedules["uniform 0.1"])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if workload.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        workload.generate(sparse.module, SEED)
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(top)

    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, f"call_overhead_{args.model}")
    setting = (f"{args.model}, latent {args.frames}x{args.height}x{args.width}, {args.dtype}, {steps} steps with "
               f"CFG, {torch.cuda.get_device_name() if workload.device.type == 'cuda' else 'CPU'}")
    with open(name + ".json", "w") as f:
        json.dump({"setting": setting, "rows": rows, **counts, "profile_top_host_ops": top}, f, indent=1)
    columns = ("wall_ms", "calls_ms", "host_in_calls_ms", "between_calls_ms", "per_call_gap_ms")
    lines = [setting, "", "| schedule | " + " | ".join(columns) + " | max abs diff vs launched |", "|---" * 7 + "|"]
    for label, r in rows.items():
        diff = r.get("max_abs_diff_vs_launched")
        lines.append(f"| {label} | " + " | ".join(f"{r[c]:.1f}" for c in columns) + f" | {'' if diff is None else diff} |")
    with open(name + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
