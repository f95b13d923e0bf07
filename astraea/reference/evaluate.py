"""Semantic accuracy of the reference model: generate clips from prompts, check each against its prompt.

    python -m astraea.reference.evaluate --prompts 16 --steps 20 --guidance 2

Chance is measured rather than assumed: the same clips are also checked against the prompt
of the next clip ("mismatched"), which is what a model that ignored its prompt would score.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .checks import check_clip, check_clips, summarize
from .data import Prompt, sample_scenes
from .model import GUIDANCE, WEIGHTS, WEIGHTS_SHA256, generate, load_reference

PROMPT_SEED = 1000


def evaluation_prompts(count: int, seed: int = PROMPT_SEED) -> list[Prompt]:
    return sample_scenes(np.random.default_rng(seed), count).prompts()


def generate_clips(transformer, encoder, prompts: list[Prompt], num_steps: int, guidance: float,
                   seed: int = 0, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Clips [N, 3, F, H, W] for the prompts, `batch_size` at a time; batch i draws its noise from seed + i."""
    negative = encoder.encode([""])
    clips = []
    for i in range(0, len(prompts), batch_size):
        embeds = encoder.encode([p.text for p in prompts[i : i + batch_size]])
        clips.append(generate(transformer, embeds, negative, num_steps, guidance, seed + i // batch_size, progress).cpu())
    return torch.cat(clips)


def score(clips: torch.Tensor, prompts: list, check=check_clip) -> dict[str, float]:
    """Check pass rates against the clips' own prompts, and the mismatched (chance) accuracy;
    `check` judges one clip against one prompt (v1's by default)."""
    summary = summarize(check_clips(clips, prompts, check))
    summary["mismatched"] = summarize(check_clips(clips, prompts[1:] + prompts[:1], check))["accuracy"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="a weights file to evaluate unchecked (default: the shipped, checked ones)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[GUIDANCE])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.weights is None:
        transformer, encoder = load_reference(args.device)
    else:
        transformer, encoder = load_reference(args.device, path=args.weights, expected_sha256=None)
    prompts = evaluation_prompts(args.prompts)
    results = []
    for guidance in args.guidance:
        clips = generate_clips(transformer, encoder, prompts, args.steps, guidance, args.seed, args.batch_size)
        results.append({"guidance": guidance, "steps": args.steps, "prompts": args.prompts, **score(clips, prompts)})
        print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results[-1].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"weights": str(args.weights or WEIGHTS),
                                         "sha256": WEIGHTS_SHA256 if args.weights is None else None,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
