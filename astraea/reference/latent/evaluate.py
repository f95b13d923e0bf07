"""Semantic accuracy of reference model v2, and how faithfully its autoencoder reconstructs.

    python -m astraea.reference.latent.evaluate --prompts 64 --steps 30 --json v2.json

Clips are generated from held-out prompts with the reference sampler (`model.generate`: the
transformer called as WanPipeline calls it, decoded by diffusers' own Wan VAE) and checked
against their prompts; chance is measured, not assumed, by checking the same clips against the
next clip's prompt, as v1's evaluation does. The autoencoder is judged on rendered clips of the
same seed: PSNR of decode(encode(clip)) against the clip, its brightest decoded value (palette
colours reach 1), and the checks on the reconstructions (the ceiling of what generation can pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ..evaluate import PROMPT_SEED, score
from .checks import check_clip
from .autoencoder import decode, encode
from .model import GUIDANCE, WEIGHTS, WEIGHTS_SHA256, generate, load_latent_reference
from .scenes import Prompt, Scenes, render, sample_scenes


def _rows(scenes: Scenes, rows: slice) -> Scenes:
    return Scenes(**{f.name: getattr(scenes, f.name)[rows] for f in dataclasses.fields(scenes)})


def evaluation_prompts(count: int, seed: int = PROMPT_SEED) -> list[Prompt]:
    """The held-out prompts clips are judged on (the scenes of `seed`, which training never draws)."""
    return sample_scenes(np.random.default_rng(seed), count).prompts()


def generate_clips(transformer, vae, encoder, prompts: list[Prompt], num_steps: int, guidance: float = GUIDANCE,
                   seed: int = 0, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Decoded clips [N, 3, F, H, W] for the prompts, `batch_size` at a time; batch i draws its
    noise from seed + i. `transformer` is any callable with the Wan signature."""
    negative = encoder.encode([""])  # on the encoder's device
    clips = []
    for i in range(0, len(prompts), batch_size):
        embeds = encoder.encode([p.text for p in prompts[i : i + batch_size]])
        clips.append(generate(transformer, vae, embeds, negative, num_steps, guidance, seed=seed + i // batch_size,
                              progress=progress)[1].cpu())
    return torch.cat(clips)


@torch.no_grad()
def evaluate(vae, transformer, encoder, count: int, steps: int, guidance: float, batch_size: int, seed: int = 0,
             reconstruct: bool = True) -> dict:
    """The checks on generated clips and, where `reconstruct`, on the autoencoder's
    reconstructions of the rendered ones (which depend on neither the transformer nor the sampler)."""
    scenes = sample_scenes(np.random.default_rng(PROMPT_SEED), count)
    prompts = scenes.prompts()
    device = next(transformer.parameters()).device
    generated = generate_clips(transformer, vae, encoder, prompts, steps, guidance, seed, batch_size)
    if not reconstruct:
        return {"prompts": count, "steps": steps, "guidance": guidance,
                "generated": score(generated, prompts, check_clip)}
    reconstructed, squared, peak = [], 0.0, -1.0
    for i in range(0, count, batch_size):
        clips = render(_rows(scenes, slice(i, min(i + batch_size, count))), device)
        back = decode(vae, encode(vae, clips))
        squared += (back - clips.float()).square().sum().item()
        peak = max(peak, back.amax().item())
        reconstructed.append(back.cpu())
    reconstructed = torch.cat(reconstructed)
    return {"prompts": count, "steps": steps, "guidance": guidance,
            "generated": score(generated, prompts, check_clip),
            "reconstructed": score(reconstructed, prompts, check_clip),
            # of the clips' mean error (range [-1, 1]: peak-to-peak 2), not a mean of dBs
            "reconstruction_psnr": 10 * math.log10(4 / (squared / reconstructed.numel())),
            "reconstruction_peak": peak}  # the brightest decoded value; palette colours reach 1


@torch.no_grad()
def prompt_use(vae, transformer, encoder, count: int, times: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9),
               batch_size: int = 4, seed: int = 1) -> dict:
    """Does the transformer read its prompts? Its velocity loss on rendered held-out clips,
    noised to each of `times` with one draw of noise (from `seed`), given each clip's own
    prompt, the next clip's and the empty prompt. A model that ignores its prompts scores the
    three alike; one that reads them scores its own prompt lowest."""
    scenes = sample_scenes(np.random.default_rng(PROMPT_SEED), count)
    device = next(transformer.parameters()).device
    clips = encode(vae, render(scenes, device))
    texts = [p.text for p in scenes.prompts()]
    prompts = {"own": texts, "another clip's": texts[-1:] + texts[:-1], "empty": [""] * count}
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    losses = {}
    for t in times:
        x = torch.lerp(clips, noise, t)
        for name, chosen in prompts.items():
            velocity = torch.cat([transformer(
                hidden_states=x[i : i + batch_size].to(transformer.dtype),
                timestep=torch.full((len(x[i : i + batch_size]),), t * 1000.0, device=device),
                encoder_hidden_states=encoder.encode(chosen[i : i + batch_size]), return_dict=False)[0].float()
                for i in range(0, count, batch_size)])
            losses.setdefault(name, {})[t] = (velocity - (noise - clips)).square().mean().item()
    return {"prompts": count, "noise_seed": seed, "velocity_loss": losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None,
                        help="a weights file to evaluate unchecked (default: the shipped, checked ones)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--generated-only", action="store_true",
                        help="skip the autoencoder's reconstructions (the same whatever the transformer or sampler)")
    parser.add_argument("--prompt-use", action="store_true",
                        help="instead of generating: the velocity loss on noised held-out clips with their own "
                             "prompt, another clip's and none (does the transformer read its prompts?)")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    if args.weights is None:
        models = load_latent_reference(args.device, dtype)
    else:
        models = load_latent_reference(args.device, dtype, path=args.weights, expected_sha256=None)
    if args.prompt_use:
        result = prompt_use(*models, args.prompts)
    else:
        result = evaluate(*models, args.prompts, args.steps, args.guidance, args.batch_size,
                          reconstruct=not args.generated_only)
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        command = " ".join(["python -m astraea.reference.latent.evaluate", *(sys.argv[1:] if argv is None else argv)])
        args.json.write_text(json.dumps({"command": command,
                                         "weights": str(args.weights) if args.weights else f"shipped ({WEIGHTS.name})",
                                         "sha256": WEIGHTS_SHA256 if args.weights is None else None, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
