"""astraea against diffusers' own caches on the shipped reference model: speed and fidelity.

Same prompts, seeds, sampler and steps for every method: dense; diffusers' `enable_cache` with
FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeerCache and MagCache at two
or more settings each (MagCache calibrated first, as its documentation says: one run with
`calibrate=True`, whose ratios the other runs use); astraea at uniform budgets, with the
searched schedules (one per speedup target found in benchmarks/results), and with parts of
its token score switched off (random tokens, change without the LSE factor, no staleness
penalty). For each: wall time and speedup over dense, PSNR/SSIM of the clips against the
dense clips, and semantic accuracy; each speedup is against a dense generation timed right
after the method (CPU speed drifts over a run). Writes JSON, a markdown table and a Pareto
plot of fidelity against speedup.

    python benchmarks/peers.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import logging
import os
import time

import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import astraea
from astraea.reference.evaluate import evaluation_prompts, generate_clips, score
from astraea.reference.model import load_reference
from astraea.search.fidelity import compare

SEARCHED = "benchmarks/results/search_reference_{steps}steps_*x.json"  # one per speedup target


class TimestepSpy:
    """The transformer, noting each call's timestep for PAB's `current_timestep_callback`
    (a pipeline would answer it from its own loop)."""

    def __init__(self, model, now: dict):
        self.model, self.now, self.cache_context = model, now, model.cache_context

    def __call__(self, **kwargs):
        self.now["t"] = float(kwargs["timestep"][0])
        return self.model(**kwargs)


class CalibrationLog(logging.Handler):
    """Collects the ratios MagCache logs at the end of a calibration run (one list per branch)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record):
        prefix = "MagCache Calibration Results: "
        message = record.getMessage()
        if message.startswith(prefix):
            self.ratios.append(ast.literal_eval(message[len(prefix):]))


def diffusers_methods(now: dict, mag_ratios: list[float], steps: int) -> dict:
    """Two or more settings of each of diffusers' caches. FasterCache runs with
    `is_guidance_distilled=True`: its unconditional-branch reuse needs both branches in one
    batch, and the sampler (like diffusers' Wan pipeline) calls them one after the other."""
    timestep = lambda: now["t"]  # noqa: E731  (what PAB and FasterCache ask the pipeline for)
    return {
        "FirstBlockCache 0.05": FirstBlockCacheConfig(threshold=0.05),
        "FirstBlockCache 0.1": FirstBlockCacheConfig(threshold=0.1),
        "FirstBlockCache 0.2": FirstBlockCacheConfig(threshold=0.2),
        "PAB skip 2": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=timestep),
        "PAB skip 3": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=3, current_timestep_callback=timestep),
        "TaylorSeer interval 3": TaylorSeerCacheConfig(cache_interval=3, taylor_factors_dtype=torch.float32),
        "TaylorSeer interval 5": TaylorSeerCacheConfig(cache_interval=5, taylor_factors_dtype=torch.float32),
        **{
            f"FasterCache skip {n}": FasterCacheConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 681),
                current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3, is_guidance_distilled=True,
            )
            for n in (2, 3)
        },
        **{
            f"MagCache {threshold}": MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=mag_ratios)
            for threshold in (0.06, 0.12, 0.24)
        },
    }


def calibrate_mag_cache(transformer, run, steps: int) -> list[float]:
    """MagCache's calibration run: no skipping; the conditional branch's ratios per step."""
    log, logger = CalibrationLog(), logging.getLogger("diffusers.hooks.mag_cache")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        run()
    finally:
        transformer.disable_cache()
        logger.removeHandler(log)
        logger.setLevel(level)
    if not log.ratios:
        raise RuntimeError("MagCache calibration logged no ratios")
    return log.ratios[0]


def astraea_methods(steps: int) -> dict:
    """Uniform budgets, every searched schedule of this step count in benchmarks/results, and
    ablations of the token score at 0.3 after 6 dense steps."""
    methods = {
        "astraea 0.5 (6 dense steps)": dict(schedule=0.5, full_steps=6),
        "astraea 0.3 (6 dense steps)": dict(schedule=0.3, full_steps=6),
        "astraea 0.5 (1 dense step)": dict(schedule=0.5, full_steps=1),
    }
    for path in sorted(glob.glob(SEARCHED.format(steps=steps))):
        target = path.rsplit("_", 1)[-1].removesuffix(".json")
        methods[f"astraea searched ({target} target)"] = dict(schedule=path, full_steps=0)
    ablation = dict(schedule=0.3, full_steps=6)
    methods["ablation: random tokens"] = dict(ablation, policy="random")
    methods["ablation: change only (no LSE)"] = dict(ablation, policy="delta")
    methods["ablation: no staleness penalty"] = dict(ablation, weight_penalty=0.0)
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    transformer, encoder = load_reference()
    prompts = evaluation_prompts(args.prompts)
    now = {"t": 1000.0}

    def run(model) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            clips = generate_clips(model, encoder, prompts, args.steps, args.guidance, batch_size=args.prompts)
        return clips, time.perf_counter() - t0

    run(transformer)  # warm-up
    dense, dense_s = run(transformer)
    rows = {"dense": {"seconds": dense_s, "speedup": 1.0, "psnr": float("inf"), "ssim": 1.0, **score(dense, prompts)}}

    def record(name, clips, seconds):
        # This machine's speed drifts over minutes: time dense again next to every method.
        reference_s = run(transformer)[1]
        fid = compare(clips, dense)
        rows[name] = {"seconds": seconds, "dense_seconds": reference_s, "speedup": reference_s / seconds,
                      "psnr": fid.psnr, "ssim": fid.ssim, **score(clips, prompts)}
        print(f"{name:32} {reference_s / seconds:5.2f}x  PSNR {fid.psnr:6.2f}  SSIM {fid.ssim:.3f}  "
              f"accuracy {rows[name]['accuracy']:.3f}", flush=True)

    spy = TimestepSpy(transformer, now)
    mag_ratios = calibrate_mag_cache(transformer, lambda: run(spy), args.steps)
    for name, config in diffusers_methods(now, mag_ratios, args.steps).items():
        transformer.enable_cache(config)
        try:
            clips, seconds = run(spy)
        finally:
            transformer.disable_cache()
        record(name, clips, seconds)  # times dense next: with the cache off
    for name, options in astraea_methods(args.steps).items():
        torch._dynamo.reset()
        compiled = torch.compile(transformer, backend=astraea.backend(**options))
        run(compiled)  # compiles
        record(name, *run(compiled))
    write(rows, args, mag_ratios)


def write(rows: dict, args, mag_ratios: list[float]) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "peers_reference.json"), "w") as f:
        json.dump({"prompts": args.prompts, "steps": args.steps, "guidance": args.guidance, "device": "cpu",
                   "threads": torch.get_num_threads(), "magcache_ratios": mag_ratios, "rows": rows}, f, indent=1)
    lines = [f"reference model, {args.prompts} prompts, {args.steps} steps, guidance {args.guidance}, CPU "
             f"({torch.get_num_threads()} threads); fidelity of the clips against the dense clips", "",
             "| method | speedup | PSNR dB | SSIM | semantic accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {r['speedup']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['accuracy']:.3f} |" for n, r in rows.items()]
    with open(os.path.join(args.out, "peers_reference.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        if name == "dense":
            continue
        ax.scatter(r["speedup"], r["psnr"], color="tab:red" if name.startswith("astraea") else "tab:gray")
        ax.annotate(name, (r["speedup"], r["psnr"]), fontsize=6)
    ax.set_xlabel("speedup over dense (CPU wall time)")
    ax.set_ylabel("PSNR against dense clips, dB")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "peers_reference.png"), dpi=130)


if __name__ == "__main__":
    main()
