"""The first generation, compile included: how long a user waits for the first video.

Every variant runs in a process of its own, since a first generation is a process's first:
dense eager; dense with diffusers' `compile_repeated_blocks()`; astraea lowering the whole
graph; astraea lowering each distinct region once (the default); astraea compiling each block
on its own (`astraea.compile_blocks`: dynamo traces one block, not the model). Each compiled variant runs
cold (empty Inductor and Triton caches) and warm (a second process on the caches the cold one
filled: what a user gets the next time they start). Each process runs one generation (the
random Wan2.1-1.3B shape, bf16, 50 steps with classifier-free guidance, from the search's
workload), then times steps at each budget: the difference between a 7-step and a 2-step
generation, so that the dense first step of each and the compile fall out.

It records the set-up call's time apart (`compile_repeated_blocks()` imports Inductor there,
astraea when it first lowers, inside the first generation); the peak memory of the first
generation and what holds it (the weights; for astraea the blocks' caches and the CUDA graphs'
memory pool; the rest is a call's activations); the compile stages as astraea logs them
(seconds into the first call); Inductor's cache hits, and the kernels it benchmarked
configurations of.

    python benchmarks/first_generation.py --frames 9 21          # 33 and 81 video frames
    python benchmarks/first_generation.py --frames 9 --variants astraea-regional dense-regional
    python benchmarks/first_generation.py --frames 9 21 --compile-caches /tmp/fg --resume   # again after a time limit
    python benchmarks/first_generation.py --frames 9 --variants dense-regional astraea-blocks --profile /tmp/prof
    python benchmarks/first_generation.py --frames 9 --variants dense-regional astraea-blocks --kernel-profile
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

VARIANTS = ("eager", "dense-regional", "astraea-whole", "astraea-regional", "astraea-blocks")
BUDGETS = (1.0, 0.5, 0.25)
STEPS = 50
LONG, SHORT = 7, 2  # per-step time: (LONG-step generation - SHORT-step generation) / (LONG - SHORT)


class Stages(logging.Handler):
    """astraea's compile messages with the seconds since `start`."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.start, self.lines = time.perf_counter(), []

    def emit(self, record):
        self.lines.append(f"{time.perf_counter() - self.start:7.1f} s  {record.getMessage()}")


def child(args) -> dict:
    """One variant in this process: the first generation, then the per-step times."""
    import torch

    import astraea
    from astraea.search.models import random_wan

    workload = random_wan("wan2.1-1.3b", frames=args.frames, height=args.height, width=args.width, num_steps=STEPS,
                          dtype=torch.bfloat16, device="cuda")
    model, backend = workload.model, None
    set_up_from = time.perf_counter()  # compile_repeated_blocks() imports Inductor here; astraea when it first lowers
    if args.variant == "eager":
        fn = model
    elif args.variant == "dense-regional":
        model.compile_repeated_blocks()
        fn = model
    elif args.variant == "astraea-blocks":
        backend = astraea.compile_blocks(model, schedule=1.0)
        fn = model
    else:
        backend = astraea.backend(schedule=1.0, regional=args.variant == "astraea-regional")
        fn = torch.compile(model, backend=backend)
    setup_s = time.perf_counter() - set_up_from
    stages = Stages()
    logging.getLogger("astraea").addHandler(stages)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    stages.start = started = time.perf_counter()
    with _profiled(args.profile and os.path.join(args.profile, f"{args.variant}_{args.frames}_{args.cache}.txt")):
        workload.generate(fn, seed=0)
        torch.cuda.synchronize()
    result = {
        "variant": args.variant, "cache": args.cache, "frames": args.frames, "tokens": args.frames * args.height * args.width // 4,
        "first_generation_s": time.perf_counter() - started, "setup_s": setup_s,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "stages": stages.lines,
        "inductor_cache": {k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cache" in k},
        # Inductor benchmarking kernels' configurations in this generation (torch's own record of it): the
        # number of kernels and the seconds; a warm start that still does is not served by the autotune cache
        "autotuned": [len(tuned), sum(tuned)] if (tuned := torch._dynamo.utils.compilation_time_metrics.get(
            "CachingAutotuner.benchmark_all_configs")) else [0, 0.0],
    }
    result["weights_gb"] = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30
    if backend is not None and backend.clock is not None:
        result["cache_gb"] = backend.clock.cache_bytes() / 2**30
        result["regions"] = [sum(len(r.instances) for r in backend.runners), len(backend.runners)]
    elif backend is not None:
        runner = backend.runners[0]
        result["cache_gb"] = runner.cache_bytes() / 2**30
        if runner.call_graphs is not None:
            result["graph_pool_gb"] = _pool_bytes(runner.call_graphs.pool) / 2**30
        graph = runner.graph_fn
        result["regions"] = [getattr(graph, "num_regions", 1), getattr(graph, "num_lowered", 1)]
    _write(args.out, result)  # what a timeout would otherwise lose
    per_step = {}
    for budget in BUDGETS if backend is not None else (1.0,):
        if backend is not None:
            backend.update(schedule=budget)
        times = {}
        for steps in (LONG, SHORT, LONG, SHORT):  # the first of each warms up (a new selection size)
            torch.cuda.synchronize()
            t = time.perf_counter()
            workload.generate(fn, seed=0, num_steps=steps)
            torch.cuda.synchronize()
            times[steps] = time.perf_counter() - t
        per_step[str(budget)] = (times[LONG] - times[SHORT]) / (LONG - SHORT)
    result["step_s"] = per_step
    if args.kernel_profile:
        if backend is not None:
            backend.update(schedule=1.0)
        result["kernels_at_1"] = _kernel_profile(lambda: workload.generate(fn, seed=0, num_steps=KERNEL_STEPS))
    return result


KERNEL_STEPS = 3


def _kernel_profile(generate) -> dict:
    """The GPU's kernel time per step of a KERNEL_STEPS-step generation (torch.profiler's CUDA
    events: kernels, copies, memsets), and the kernels that take most: beside the measured step,
    what the GPU does and how long it waits on the host."""
    import torch

    generate()  # warm: the profile sees replayed code, not first calls
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        generate()
        torch.cuda.synchronize()
    kernels = [e for e in profile.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    per_step = lambda us: us / 1e3 / KERNEL_STEPS  # noqa: E731  (microseconds in all -> ms a step)
    return {"gpu_ms_per_step": per_step(sum(e.self_device_time_total for e in kernels)),
            "top": [[e.key[:100], e.count // KERNEL_STEPS, round(per_step(e.self_device_time_total), 2)]
                    for e in kernels[:12]]}


@contextlib.contextmanager
def _profiled(path: str | None):
    """Python's profile of the block, its 60 costliest functions by cumulative and by own time
    written to `path` (nothing without one). Time waiting on the GPU lands on the call that
    waits, so it says where the host spends a start, not what the GPU does."""
    if not path:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            stats = pstats.Stats(profile, stream=f)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(60)


def _pool_bytes(pool) -> int:
    """What the CUDA graphs' private memory pool holds (its segments)."""
    import torch

    return sum(s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == tuple(pool))


def _write(path: str, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


def driver(args) -> None:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    here = os.path.abspath(__file__)
    root = os.path.abspath(args.compile_caches or tempfile.mkdtemp(prefix="first_generation_"))
    done_before = set()  # this run's, known by its caches' folder: --out keeps earlier runs' rows too
    if args.resume and os.path.exists(args.out):
        done_before = {(r["frames"], r["variant"], r["cache"]) for r in map(json.loads, open(args.out))
                       if r.get("compile_caches") == root}
    for frames in args.frames:
        for variant in args.variants:
            caches = os.path.join(root, f"{variant}_{frames}")
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(caches, "triton"))
            for cache in args.caches if variant != "eager" else ("cold",):
                if (frames, variant, cache) in done_before:
                    print(f"{variant} {frames} {cache}: recorded in {args.out}", flush=True)
                    continue
                if cache == "cold" and os.path.exists(caches):
                    shutil.rmtree(caches)  # a cold start starts from empty caches
                command = [sys.executable, here, "--child", "--variant", variant, "--cache", cache, "--frames", str(frames),
                           "--height", str(args.height), "--width", str(args.width), "--out", args.out + ".part"]
                if args.profile:
                    command += ["--profile", os.path.abspath(args.profile)]
                if args.kernel_profile:
                    command.append("--kernel-profile")
                started = time.perf_counter()
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                print(f"{variant} {frames} {cache}: rc {done.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
                if done.returncode:
                    print(done.stderr[-3000:], flush=True)
                else:
                    _write(args.out, {**json.loads(done.stdout.strip().splitlines()[-1]), "compile_caches": root})
    report(args.out)


def report(path: str) -> None:
    rows = [json.loads(line) for line in open(path)]
    lines = ["| frames (tokens) | variant | compile caches | set-up s | first generation s | peak GB | weights GB | "
             "block caches GB | CUDA graph pool GB | " + " | ".join(f"step s at {b}" for b in BUDGETS)
             + " | regions (lowered), or blocks (graphs) |",
             "|---" * (9 + len(BUDGETS) + 1) + "|"]
    for r in rows:
        steps = " | ".join(f"{r['step_s'][str(b)]:.3f}" if str(b) in r.get("step_s", {}) else "" for b in BUDGETS)
        regions = f"{r['regions'][0]} ({r['regions'][1]})" if "regions" in r else ""
        gb = " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("weights_gb", "cache_gb", "graph_pool_gb"))
        setup = f"{r['setup_s']:.1f}" if "setup_s" in r else ""
        lines.append(f"| {4 * (r['frames'] - 1) + 1} ({r['tokens']}) | {r['variant']} | {r['cache']} | {setup} | "
                     f"{r['first_generation_s']:.1f} | {r['peak_gb']:.2f} | {gb} | {steps} | {regions} |")
    table = "\n".join(lines)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[9], help="latent frames (9: 33 video frames)")
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=104)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--caches", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                        help="cold: empty Inductor and Triton caches; warm: a second process on the cold one's")
    parser.add_argument("--out", default="benchmarks/results/first_generation.jsonl")
    parser.add_argument("--compile-caches",
                        help="folder of each variant's Inductor and Triton caches (default: a new temporary one); the "
                             "same folder lets --resume run a warm start after another command's cold one")
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs --out already records with these --compile-caches: a run split over "
                             "several commands on one machine")
    parser.add_argument("--kernel-profile", action="store_true",
                        help="also profile a short generation at budget 1.0 with torch.profiler: the GPU's kernel time "
                             "per step and its costliest kernels (`kernels_at_1` in --out)")
    parser.add_argument("--profile", default=None,
                        help="a folder: each process's first generation profiled with cProfile, one text file each")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=("cold", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.frames = args.frames[0]
        print(json.dumps(child(args)))
    else:
        driver(args)


if __name__ == "__main__":
    main()
