"""Generate clips with a shipped reference model, dense and sparse, and compare them.

`astraea demo` runs the same prompts, seeds and sampler twice: with the plain transformer, and
with `torch.compile(transformer, backend=astraea.backend(...))` at a schedule (by default the
model's shipped searched one, `astraea/assets/schedules/`). It prints the speedup, how close
the sparse clips stay to the dense ones (PSNR, SSIM) and how well each set follows its prompts
(the model's analytic checks), and writes a side-by-side GIF, a plot of the budget each step
ran at, and a heat map of the share of each latent frame's tokens recomputed at each step.
Everything runs offline on a CPU in a few minutes (reference v2 decodes 256x256 clips through
its VAE, about 10 s a clip there: two prompts by default).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import torch
from PIL import Image

import astraea

from .model import ASSETS
from ..schedule import Schedule
from ..search.fidelity import compare
from .subjects import SUBJECTS, load_subject

GIF_SCALE = 3
GIF_FRAME_MS = 125


SCHEDULES = ASSETS / "schedules"  # {model}.json: the best searched schedule shipped for each model
DEFAULT_MODEL = "reference-v2"  # the subject most like a real video DiT; v1 (pixel space) runs faster
DEFAULT_PROMPTS = {"reference": 8, "reference-v2": 2}
UNIFORM_FULL_STEPS = 6  # dense steps before a uniform budget (a searched schedule has its own)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=SUBJECTS, default=None,
                        help=f"reference model (default: {DEFAULT_MODEL})")
    parser.add_argument("--weights", type=Path, default=None, help="reference-v2: a weights file to load unchecked")
    parser.add_argument("--prompts", type=int, default=None,
                        help="clips to generate (default: 8 for reference, 2 for reference-v2)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--schedule", default=None,
                        help="a budget for every step, comma-separated budgets per step, or a schedule file "
                             "(default: the model's shipped searched schedule, else 0.5)")
    parser.add_argument("--full-steps", type=int, default=None,
                        help=f"first steps that run dense whatever the schedule says (default: 0 for a schedule "
                             f"file, {UNIFORM_FULL_STEPS} for budgets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("astraea-demo"), help="folder for the GIF and the plots")


def parse_schedule(text: str):
    """A number, a list of numbers, or (anything else) the path of a schedule file."""
    try:
        budgets = [float(part) for part in text.split(",")]
    except ValueError:
        return text
    return budgets[0] if len(budgets) == 1 else budgets


def run(args: argparse.Namespace) -> int:
    name = args.model or ("reference-v2" if args.weights is not None else DEFAULT_MODEL)
    if name != "reference-v2" and args.weights is not None:
        raise SystemExit(f"astraea demo: --weights names a reference-v2 weights file; --model is {name}")
    subject = load_subject(name, path=args.weights)
    config, described = demo_config(args, name)
    prompts = subject.prompts(args.prompts or DEFAULT_PROMPTS[name])
    print(f"{name}, {described}")
    for i, prompt in enumerate(prompts):
        print(f"{i}: {prompt.text}")

    def timed(model, label):
        print(f"{label}:", flush=True)
        start = time.perf_counter()
        clips = subject.generate(model, prompts, args.steps, args.guidance, args.seed, progress=True)
        return clips, time.perf_counter() - start

    dense, dense_s = timed(subject.transformer, "dense")
    backend = astraea.backend(config)
    sparse_model = torch.compile(subject.transformer, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():  # compiles, at the timed run's shapes
        sparse_model(**example_call(subject, prompts))
    compile_s = time.perf_counter() - start
    backend.update()  # forget the warm-up call: the timed generation starts afresh
    recomputed = RecomputeMap(backend)
    handle = sparse_model.register_forward_hook(recomputed)
    try:
        sparse, sparse_s = timed(sparse_model, f"sparse (compiled in {compile_s:.1f} s)")
    finally:
        handle.remove()

    fidelity = compare(sparse, dense)
    rows = [("dense", dense_s, subject.score(dense, prompts), None), ("sparse", sparse_s, subject.score(sparse, prompts), fidelity)]
    print(f"\n{'':8}{'seconds':>9}{'speedup':>9}{'PSNR dB':>9}{'SSIM':>7}{'accuracy':>10}{'chance':>8}")
    for label, seconds, semantic, fid in rows:
        closeness = f"{fid.psnr:9.2f}{fid.ssim:7.3f}" if fid else f"{'-':>9}{'-':>7}"
        print(f"{label:8}{seconds:9.1f}{dense_s / seconds:9.2f}{closeness}{semantic['accuracy']:10.3f}{semantic['mismatched']:8.3f}")
    print("accuracy: share of the model's checks a clip passes against its own prompt; chance: against another "
          f"clip's prompt (dense accuracy on more prompts, and how the model was trained: {ASSETS / subject.card})")

    args.out.mkdir(parents=True, exist_ok=True)
    write_gif(dense, sparse, args.out / "dense_vs_sparse.gif")
    plot_budgets(backend, args.steps, args.out / "budgets.png")
    recomputed.plot(args.out / "recomputed.png")
    print(f"wrote {args.out / 'dense_vs_sparse.gif'} (left dense, right sparse, one row per prompt), "
          f"{args.out / 'budgets.png'} and {args.out / 'recomputed.png'}")
    return 0


def demo_config(args: argparse.Namespace, name: str) -> tuple[astraea.AstraeaConfig, str]:
    """The backend's config and a line describing it: the schedule asked for, or the model's
    shipped searched one (run with the options it was searched with), or a uniform 0.5."""
    shipped = SCHEDULES / f"{name}.json"
    schedule = parse_schedule(args.schedule) if args.schedule else str(shipped) if shipped.exists() else 0.5
    full_steps = args.full_steps if args.full_steps is not None else 0 if isinstance(schedule, str) else UNIFORM_FULL_STEPS
    described = f"schedule {schedule}, first {full_steps} steps dense"
    searched = {}
    if isinstance(schedule, str):
        schedule = Schedule.load(schedule)
        searched = {option: schedule.searched_option(option) for option in ("policy", "skip", "reuse")}
        searched = {option: value for option, value in searched.items() if value is not None}
        described += "".join(f", {option} {value}" for option, value in searched.items())
    return astraea.AstraeaConfig(schedule=schedule, full_steps=full_steps, **searched), described


def example_call(subject, prompts: list) -> dict:
    """Keyword arguments of one transformer call as the timed generation makes them (same shapes)."""
    embeds = subject.encoder.encode([p.text for p in prompts])
    return dict(hidden_states=torch.zeros(len(prompts), *subject.latent_shape()), timestep=torch.full((len(prompts),), 999.0),
                encoder_hidden_states=embeds, return_dict=False)


class RecomputeMap:
    """The share of each latent frame's tokens that the sparse blocks recomputed at each step of
    the first guidance branch (cond): a forward hook reading, after every call, which tokens'
    staleness is zero in the runner's state (averaged over the blocks)."""

    def __init__(self, backend):
        self.backend, self.rows = backend, []

    def __call__(self, module, args, output) -> None:
        runner = self.backend.runners[-1]
        if runner.records[-1].branch != 0:
            return
        fresh = torch.stack([block.stale[0] == 0 for block in runner.branches[0].blocks]).float().mean(0).cpu()
        grid = runner.report.token_grid or (1, fresh.numel())  # (frames, ...) of the token axis
        self.rows.append(fresh.view(grid[0], -1).mean(1))

    def plot(self, path: Path) -> None:
        shares = torch.stack(self.rows).T.numpy()  # [frames, steps]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        image = ax.imshow(shares, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set(xlabel="step", ylabel="latent frame", title="share of each frame's tokens recomputed (cond branch)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


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
    ax.step(steps, [r.budget for r in last if r.branch == 0], "k:", where="mid", label="schedule (as run)")
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
