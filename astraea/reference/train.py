"""Train the reference model for a wall-time budget: rectified flow on `data.py`'s clips.

    python -m astraea.reference.train --minutes 8 --out DIR

x_t = (1 - t) x0 + t noise, with t logit-normal and leaning to the noisy end. The
transformer predicts x0 (see model.py); the loss is on the velocity it implies,
|(x_t - prediction) / t - (noise - x0)|^2 = |x0 - prediction|^2 / t^2, with t floored at
`MIN_T` so that the nearly clean end does not dominate. One prompt in ten is replaced by the
empty prompt so that classifier-free guidance has an unconditional model to push against.
Clips are rendered on the training device at every step, so data never waits on a loader;
the learning rate follows the elapsed fraction of the budget, so a run ends annealed
whatever the speed of the machine. Writes to DIR: reference.safetensors (the EMA weights),
loss.png and training.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from . import data
from .model import CONFIG, build_model, save_reference
from .text import VOCAB, tokenize

MIN_T = 0.05
T_MEAN, T_STD = 0.8, 0.8  # of logit(t)
TEXT_DROPOUT = 0.1
VALIDATION_SEED = 2**31 - 1


def flow_loss(transformer, encoder, clips, ids, t, noise) -> torch.Tensor:
    """Mean squared velocity error of the clean-clip predictions, per clip [B]."""
    shape = (-1, 1, 1, 1, 1)
    x_t = torch.lerp(clips, noise, t.view(shape))
    prediction = transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=encoder(ids), return_dict=False)[0]
    return ((prediction.float() - clips) / t.clamp(min=MIN_T).view(shape)).square().mean((1, 2, 3, 4))


def batch(rng: np.random.Generator, size: int, device, dropout: float = 0.0):
    """Clips, prompt ids (a `dropout` fraction of them empty), times and noise for one step."""
    scenes = data.sample_scenes(rng, size)
    ids = tokenize([p.text for p in scenes.prompts()])
    ids[torch.from_numpy(rng.random(size) < dropout)] = 0
    t = torch.sigmoid(torch.randn(size, device=device) * T_STD + T_MEAN)
    clips = data.render(scenes, device)
    return clips, ids.to(device), t, torch.randn_like(clips)


def learning_rate(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then a cosine over the budget down to a twentieth."""
    return base * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the training loop")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="stop earlier, after this many steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=200, help="steps")
    parser.add_argument("--ema", type=float, default=0.999, help="decay of the weights average that is saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="steps per point of the loss curve")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    transformer, encoder = build_model()
    transformer.to(device).train()
    encoder.to(device).train()
    averages = [copy.deepcopy(m).requires_grad_(False) for m in (transformer, encoder)]
    params = [p for m in (transformer, encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    budget = args.minutes * 60

    curve, window, step, start = [], torch.zeros((), device=device), 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget and step != args.max_steps:
        progress = max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, progress, args.warmup)
        clips, ids, t, noise = batch(rng, args.batch_size, device, TEXT_DROPOUT)
        with autocast:
            loss = flow_loss(transformer, encoder, clips, ids, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        update_averages(zip(averages, (transformer, encoder)), min(args.ema, (1 + step) / (10 + step)))
        window += loss.detach()
        step += 1
        if step % args.log_every == 0:
            curve.append((step, round(time.perf_counter() - start, 1), window.item() / args.log_every))
            window.zero_()
            print(f"step {step}  {curve[-1][1]:.0f}s  loss {curve[-1][2]:.4f}  lr {optimizer.param_groups[0]['lr']:.2e}", flush=True)
    seconds = time.perf_counter() - start

    validation = validation_loss(*averages, device, autocast)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": CONFIG,
        "vocab": list(VOCAB),
        "data": {"frames": data.FRAMES, "size": data.SIZE, "shapes": data.SHAPES, "palette": data.PALETTE,
                 "directions": list(data.DIRECTIONS), "backgrounds": data.BACKGROUNDS,
                 "max_objects": data.MAX_OBJECTS, "half_size": data.HALF_SIZE, "speed": data.SPEED},
        "training": {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
                     "seed": args.seed, "text_dropout": TEXT_DROPOUT, "min_t": MIN_T,
                     "logit_t": [T_MEAN, T_STD], "optimizer": "AdamW(betas=(0.9, 0.99), weight_decay=0.01)",
                     "precision": "bf16 autocast" if device.type == "cuda" else "fp32"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": step,
        "clips_seen": step * args.batch_size,
        "seconds": round(seconds, 1),
        "final_loss": curve[-1][2] if curve else None,
        "validation_loss": validation,
        "curve": curve,
    }
    record["sha256"] = save_reference(args.out / "reference.safetensors", *averages,
                                      {"steps": step, "seconds": round(seconds, 1)})
    (args.out / "training.json").write_text(json.dumps(record, indent=1))
    plot(curve, args.out / "loss.png")
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}, indent=1))
    return 0


@torch.no_grad()
def validation_loss(transformer, encoder, device, autocast, count: int = 256, size: int = 64) -> float:
    """Loss of the given weights on a fixed set of clips, times and noise."""
    rng = np.random.default_rng(VALIDATION_SEED)
    torch.manual_seed(VALIDATION_SEED)
    total = 0.0
    for _ in range(count // size):
        with autocast:
            total += flow_loss(transformer.eval(), encoder.eval(), *batch(rng, size, device)).sum().item()
    return total / count


def update_averages(pairs, decay: float) -> None:
    """Move each (average, model) pair's averaged weights towards the model's, by 1 - decay."""
    with torch.no_grad():
        for average, model in pairs:
            torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1 - decay)


def plot(curve, path: Path, loss: str = "velocity loss", title: str = "reference model") -> None:
    """The loss curve [(step, seconds, loss)] of a training run, on a log scale."""
    steps, seconds, losses = zip(*curve) if curve else ((), (), ())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel=f"{loss} (mean over the logging window)", yscale="log",
           title=f"{title}: {steps[-1] if steps else 0} steps, {seconds[-1] / 60 if seconds else 0:.1f} min")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
