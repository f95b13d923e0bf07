"""`astraea.tune` on a Wan2.1-1.3B-shaped WanPipeline: its wall time, and its predicted latency against the measured one.

The pipeline is diffusers' own `WanPipeline` as Wan 2.1 ships it (UniPC multistep on flow
sigmas, shift 3; classifier-free guidance 5 as two transformer calls per step; Wan's VAE
config), with random weights (nothing can be downloaded) and prompt embeddings in place of the
T5 encoder (random [1, 512, 4096], one pair per prompt). Latency does not depend on the weights;
fidelity on random weights flatters step skipping (benchmarks/NOTES.md), so the schedule found
is evidence about `tune`, not about quality.

    python benchmarks/tune_wan.py --out benchmarks/results/tune_wan --steps 30 --frames 33 --speedup 2
    python benchmarks/tune_wan.py --preset tiny --device cpu --out /tmp/tune_tiny     # a smoke run

Writes `schedule.json` (with its plot, cost table and checkpoint beside it: a second run with
the same --out resumes an interrupted one) and `tune.json`: the wall time of the whole call,
the search's predicted and measured latency of the chosen schedule and of the dense one, and
the held-out fidelity.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

import astraea
from astraea.search import SearchSettings
from astraea.search.models import WAN_PRESETS, WAN_TEXT_TOKENS

def _vae(preset: str, channels: int) -> AutoencoderKLWan:
    """Wan 2.1's VAE configuration for the real shape; a narrow one of the same class otherwise."""
    if preset == "wan2.1-1.3b":
        return AutoencoderKLWan()
    return AutoencoderKLWan(base_dim=8, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            latents_mean=[0.0] * channels, latents_std=[1.0] * channels)


def build(preset: str, device: str, dtype: torch.dtype, prompts: int, seed: int = 0):
    """(WanPipeline with random weights, prompt dicts): `preset` is a Wan shape of `WAN_PRESETS`."""
    config = WAN_PRESETS[preset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            transformer = WanTransformer3DModel(patch_size=(1, 2, 2), cross_attn_norm=True, **config).to(dtype)
            vae = _vae(preset, config["in_channels"])
        embeds = torch.randn(prompts, 2, WAN_TEXT_TOKENS[preset], config["text_dim"])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.to(device), transformer=transformer.eval(),
                       scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    prompt_dicts = [{"prompt_embeds": e[0:1].to(device, dtype), "negative_prompt_embeds": e[1:2].to(device, dtype)}
                    for e in embeds]
    return pipe, prompt_dicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=tuple(WAN_PRESETS), default="wan2.1-1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=33, help="video frames (latent frames: (frames - 1) / 4 + 1)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--generations", type=int, default=SearchSettings().generations)
    parser.add_argument("--minutes", type=float, help="start no search generation after this many minutes")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="score latents, not decoded videos")
    parser.add_argument("--decode-candidates", action="store_true",
                        help="decode every candidate, not only the confirmed ones and the held-out seeds")
    parser.add_argument("--out", required=True, help="folder for the schedule, its tables and tune.json")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    pipe, prompts = build(args.preset, args.device, dtype, args.prompts)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    result = astraea.tune(pipe, prompts, speedup=args.speedup, num_inference_steps=args.steps,
                          output=os.path.join(args.out, "schedule.json"), seeds=args.seeds, held_out=args.held_out,
                          settings=SearchSettings(generations=args.generations, minutes=args.minutes), decode=args.decode,
                          decode_candidates=args.decode_candidates,
                          height=args.height, width=args.width, num_frames=args.frames, guidance_scale=5.0)
    wall_s = time.perf_counter() - start
    search = result.searches["transformer"]
    record = {
        "args": vars(args), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "wall_s": wall_s, "budgets": list(search.chosen.budgets),
        "chosen": {"predicted_ms": search.prediction.predicted_ms, "measured_ms": search.prediction.measured_ms,
                   "error": search.prediction.error} if search.prediction else None,
        "dense": {"predicted_ms": search.dense.predicted_ms, "measured_ms": search.dense.measured_ms,
                  "error": search.dense.error} if search.dense else None,
        "held_out": result.held_out["transformer"].to_json() if result.held_out["transformer"] else None,
        "search_wall_s": search.wall_s,
    }
    with open(os.path.join(args.out, "tune.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "args"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
