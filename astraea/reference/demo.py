"""Generate clips with the shipped reference model, dense and sparse, and compare them.

`astraea demo` runs the same prompts, seeds and sampler twice: with the plain transformer, and
with `torch.compile(transformer, backend=astraea.backend(...))` at a schedule. It prints the
speedup, how close the sparse clips stay to the dense ones (PSNR, SSIM) and how well each set
follows its prompts (`checks.py`), and writes a side-by-side GIF and a plot of the budget
each step ran at. Everything runs offline on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

import astraea

from ..search.fidelity import compare
from .evaluate import evaluation_prompts, generate_clips, score
from .model import GUIDANCE, load_reference

GIF_SCALE = 3
GIF_FRAME_MS = 125


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=8, help="clips to generate (default: 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE,
                        help=f"classifier-free guidance scale (default: {GUIDANCE:g})")
    parser.add_argument("--schedule", default="0.5",
                        help="a budget for every step, comma-separated budgets per step, or a schedule file (default: 0.5)")
    parser.add_argument("--full-steps", type=int, default=6,
                        help="first steps that run dense whatever the schedule says (default: 6; with 1, budget 0.5 "
                             "drifts far from the dense clips on this model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("astraea-demo"), help="folder for the GIF and the plot")


def parse_schedule(text: str):
    """A number, a list of numbers, or (anything else) the path of a schedule file."""
    try:
        budgets = [float(part) for part in text.split(",")]
    except ValueError:
        return text
    return budgets[0] if len(budgets) == 1 else budgets


def run(args: argparse.Namespace) -> int:
    config = astraea.AstraeaConfig(schedule=parse_schedule(args.schedule), full_steps=args.full_steps)
    transformer, encoder = load_reference()
    prompts = evaluation_prompts(args.prompts)
    for i, prompt in enumerate(prompts):
        print(f"{i}: {prompt.text}")

    def timed(model, name):
        print(f"{name}:", flush=True)
        start = time.perf_counter()
        clips = generate_clips(model, encoder, prompts, args.steps, args.guidance, args.seed, progress=True)
        return clips, time.perf_counter() - start

    dense, dense_s = timed(transformer, "dense")
    backend = astraea.backend(config)
    sparse_model = torch.compile(transformer, backend=backend)
    start = time.perf_counter()
    generate_clips(sparse_model, encoder, prompts, 2, args.guidance, args.seed)  # compiles, at the timed run's shapes
    compile_s = time.perf_counter() - start
    sparse, sparse_s = timed(sparse_model, f"sparse (schedule {args.schedule}, first {args.full_steps} steps dense; "
                                           f"compiled in {compile_s:.1f} s)")

    fidelity = compare(sparse, dense)
    rows = [("dense", dense_s, score(dense, prompts), None), ("sparse", sparse_s, score(sparse, prompts), fidelity)]
    print(f"\n{'':8}{'seconds':>9}{'speedup':>9}{'PSNR dB':>9}{'SSIM':>7}{'accuracy':>10}{'chance':>8}")
    for name, seconds, semantic, fid in rows:
        closeness = f"{fid.psnr:9.2f}{fid.ssim:7.3f}" if fid else f"{'-':>9}{'-':>7}"
        print(f"{name:8}{seconds:9.1f}{dense_s / seconds:9.2f}{closeness}{semantic['accuracy']:10.3f}{semantic['mismatched']:8.3f}")
    print("accuracy: share of the checks (count, colour, shape, direction, smooth) a clip passes against its own "
          "prompt; chance: against another clip's prompt")

    args.out.mkdir(parents=True, exist_ok=True)
    write_gif(dense, sparse, args.out / "dense_vs_sparse.gif")
    plot_budgets(backend, args.steps, args.out / "budgets.png")
    print(f"wrote {args.out / 'dense_vs_sparse.gif'} (left dense, right sparse, one row per prompt) "
          f"and {args.out / 'budgets.png'}")
    return 0


def write_gif(dense: torch.Tensor, sparse: torch.Tensor, path: Path) -> None:
    """One row per clip, dense on the left and sparse on the right, GIF_SCALE times enlarged."""
    pairs = torch.cat([dense, sparse], dim=-1)  # [B, 3, F, H, 2W]
    grid = torch.cat(list(pairs), dim=-2)  # [3, F, B*H, 2W]
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    pixels = pixels.repeat(GIF_SCALE, axis=1).repeat(GIF_SCALE, axis=2)
    frames = [Image.fromarray(np.ascontiguousarray(frame)) for frame in pixels]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)


def plot_budgets(backend, num_steps: int, path: Path) -> None:
    """Budget and recomputed share of tokens per step, per guidance branch, of the last generation."""
    runner = backend.runners[-1]
    last = runner.records[-num_steps * len({r.branch for r in runner.records}):]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = range(num_steps)
    ax.step(steps, [backend.config.step_budget(s) for s in steps], "k:", where="mid", label="schedule")
    for branch, marker in zip(sorted({r.branch for r in last}), "ox+*"):
        records = [r for r in last if r.branch == branch]
        label = ("cond", "uncond")[branch] if branch < 2 else f"branch {branch}"
        ax.plot([r.step for r in records], [r.tokens / runner.num_tokens for r in records], marker, fillstyle="none",
                label=f"{label}: tokens recomputed")
    ax.set(xlabel="step", ylabel="share of tokens per sparse block", ylim=(-0.05, 1.05),
           title=f"per-step budgets, {runner.report.num_sparse_blocks} sparse blocks")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
