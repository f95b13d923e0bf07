"""The workloads `astraea profile` and `astraea search` know by name.

- "reference": the shipped reference model v1 (`astraea.reference`), trained, in pixel space:
  fidelity on it means what a person would see. Calibration seeds draw its prompts.
- "reference-v2": reference model v2 (`astraea.reference.latent`): Wan's VAE and transformer,
  2,304 latent tokens, velocity prediction, sampled as Wan is (shift 3); fidelity on the clips
  its VAE decodes.
- "tiny", "wan2.1-1.3b": randomly initialised Wan transformers. Latency depends on the
  architecture and the shapes, not on the weights, so a random Wan2.1-1.3B-shaped model
  gives the trained model's cost table without its weights; fidelity on random weights is
  weaker evidence (hence the model-contribution view). "tiny" keeps CPU tests fast.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import WanTransformer3DModel

from .workload import Workload, random_text

WAN_PRESETS = {
    "tiny": dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ),
    "wan2.1-1.3b": dict(
        num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=30, rope_max_seq_len=1024,
    ),
}
# Text tokens of the conditioning: cross-attention cost grows with them (Wan's T5 gives 512).
WAN_TEXT_TOKENS = {"tiny": 16, "wan2.1-1.3b": 512}
MODELS = ("reference", "reference-v2", *WAN_PRESETS)


def random_wan(
    preset: str = "tiny",
    *,
    frames: int,
    height: int,
    width: int,
    num_steps: int,
    text_tokens: int | None = None,
    guidance: float = 5.0,
    shift: float = 5.0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    batch: int = 1,
) -> Workload:
    """A workload on a random Wan transformer; frames, height and width are latent sizes.
    `text_tokens` defaults to the preset's."""
    if preset not in WAN_PRESETS:
        raise ValueError(f"unknown Wan preset {preset!r}; known: {sorted(WAN_PRESETS)}")
    config = WAN_PRESETS[preset]
    device = torch.device(device)
    # Built on the device (a 1.3B model initialises slowly on a CPU), without touching the
    # caller's random state.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), cross_attn_norm=True, **config)
    if dtype != torch.float32:  # diffusers warns about any cast, to float32 too
        model = model.to(dtype)
    return Workload(
        model.eval().requires_grad_(False),
        latent_shape=(config["in_channels"], frames, height, width),
        conditioning=random_text(text_tokens or WAN_TEXT_TOKENS[preset], config["text_dim"]),
        num_steps=num_steps,
        guidance=guidance,
        shift=shift,
        dtype=dtype,
        device=device,
        batch=batch,
    )


def reference(
    name: str = "reference", *, num_steps: int, guidance: float | None = None, dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu", path: str | None = None, batch: int = 1
) -> Workload:
    """A trained reference model (`astraea.reference.subjects`: v1 "reference", v2
    "reference-v2"; `path` names a v2 weights file to load unchecked), sampled as its own
    `generate` samples it, at its guidance scale unless `guidance` is given; a calibration
    seed draws its prompt, and fidelity is on the clips it decodes."""
    from astraea.reference.subjects import load_subject

    subject = load_subject(name, device, dtype, path)
    empty = subject.encoder.encode([""])

    def conditioning(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return subject.encoder.encode([subject.prompt(seed).text]), empty

    return Workload(
        subject.transformer,
        latent_shape=subject.latent_shape(),
        conditioning=conditioning,
        num_steps=num_steps,
        prediction=subject.prediction,
        guidance=subject.guidance if guidance is None else guidance,
        shift=subject.shift,
        dtype=dtype,
        device=device,
        decoder=subject.decode,
        batch=batch,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming a workload, shared by `astraea profile` and `astraea search`."""
    parser.add_argument("--model", choices=MODELS, default="tiny", help="model to run (default: tiny)")
    parser.add_argument("--frames", type=int, default=3, help="latent frames (random Wan models)")
    parser.add_argument("--height", type=int, default=8, help="latent height (random Wan models)")
    parser.add_argument("--width", type=int, default=8, help="latent width (random Wan models)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of a generation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the model's own, 2 for reference, 4 for reference-v2, "
                             "5 for Wan)")
    parser.add_argument("--batch", type=int, default=1,
                        help="clips per generation (a small model can leave a GPU idle at batch 1; the cost table "
                             "records the batch)")
    parser.add_argument("--weights", default=None,
                        help="reference-v2 only: a weights file to load unchecked instead of the shipped one")


def from_arguments(args: argparse.Namespace) -> Workload:
    dtype, device = getattr(torch, args.dtype), args.device
    if args.weights is not None and args.model != "reference-v2":
        raise SystemExit(f"--weights names a reference-v2 weights file; --model is {args.model}")
    guidance = {} if args.guidance is None else {"guidance": args.guidance}
    if args.model in ("reference", "reference-v2"):
        return reference(args.model, num_steps=args.steps, dtype=dtype, device=device, path=args.weights,
                         batch=args.batch, **guidance)
    return random_wan(args.model, frames=args.frames, height=args.height, width=args.width,
                      num_steps=args.steps, dtype=dtype, device=device, batch=args.batch, **guidance)
