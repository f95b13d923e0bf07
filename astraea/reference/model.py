"""The reference model: diffusers' own WanTransformer3DModel, small, in pixel space.

It is the real class, so whatever astraea does to it, it does to every Wan-shaped video DiT;
it is small enough that a forward of one 16x64x64 clip (512 tokens of 2x8x8 pixels) takes
tens of milliseconds on a CPU, and it is trained on `data.py`'s clips, so its outputs can be
checked for meaning (`checks.py`), not only compared with the dense model.

The transformer predicts the clean clip; the sampler turns that into the flow-matching
velocity (noise - clip) = (x_t - prediction) / t. A 2x8x8x3 = 384-value patch does not fit
through a 256-wide residual stream, so a model asked for the velocity directly would have to
carry the noise through that bottleneck and leave part of it in every generated clip; the
clean clip is low-dimensional and passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import astraea.parallel

from .data import FRAMES, SIZE
from .text import TEXT_DIM, PromptEncoder

CONFIG = dict(
    patch_size=(2, 8, 8),
    num_attention_heads=4,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=1024,
    num_layers=6,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "reference.safetensors"
WEIGHTS_SHA256 = "67565c5186c71f5ecb3fd3c7c5a0d3633fd68d4c96fae7c0b7f674683bb59d06"


class WeightsError(RuntimeError):
    """Reference weights that are missing, corrupt or of another model."""


def build_model() -> tuple[WanTransformer3DModel, PromptEncoder]:
    """A freshly initialised transformer and prompt encoder of the reference configuration."""
    return WanTransformer3DModel(**CONFIG), PromptEncoder()


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def half_weights(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every model's weights in float16, named "<model>.<weight>", as a reference weights file
    holds them (v1's and v2's)."""
    return {f"{name}.{k}": v.detach().to("cpu", torch.float16).contiguous()
            for name, m in models.items() for k, v in m.state_dict().items()}


def read_weights(path: Path, expected_sha256: str | None, what: str, train: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, refused when it is missing or has another sha256."""
    if not path.is_file():
        raise WeightsError(f"{what} {path} not found; train them with `python -m {train}`")
    if expected_sha256 is not None and (found := sha256(path)) != expected_sha256:
        raise WeightsError(
            f"{what} {path} have sha256 {found}, expected {expected_sha256}: "
            "the file is corrupt or not the one this astraea was released with; reinstall astraea"
        )
    return load_file(str(path))


def load_weights(tensors: dict, models: dict[str, torch.nn.Module], what: str) -> None:
    """Load each model from the tensors named "<model>.<weight>"; a mismatch is a WeightsError."""
    for name, module in models.items():
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"{what} do not fit their configuration: {e}") from e


def ready(transformer, others, device, dtype) -> None:
    """Move the models to `device` and `dtype` (the transformer's float32 modules kept, as
    diffusers' from_pretrained does), in eval mode without gradients."""
    for module in others:
        module.to(device, dtype)
    transformer.to(device)
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, param in transformer.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    for module in (transformer, *others):
        module.eval().requires_grad_(False)


def save_reference(path: str | Path, transformer, encoder, metadata: dict) -> str:
    """Write both models' weights in float16 to one safetensors file; returns its sha256."""
    tensors = half_weights({"transformer": transformer, "text": encoder})
    save_file(tensors, str(path), metadata={"config": json.dumps(CONFIG), **{k: json.dumps(v) for k, v in metadata.items()}})
    return sha256(path)


def load_reference(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path = WEIGHTS,
    expected_sha256: str | None = WEIGHTS_SHA256,
) -> tuple[WanTransformer3DModel, PromptEncoder]:
    """The trained transformer and prompt encoder, in eval mode.

    By default the weights shipped with astraea, refused unless their sha256 is the recorded
    one; `expected_sha256=None` loads another file (a fresh training run's) unchecked.
    """
    path = Path(path)
    tensors = read_weights(path, expected_sha256, "reference weights", "astraea.reference.train")
    transformer, encoder = build_model()
    load_weights(tensors, {"transformer": transformer, "text": encoder}, f"reference weights {path}")
    ready(transformer, (encoder,), device, dtype)
    return transformer, encoder


GUIDANCE = 2.0  # the sampler's classifier-free guidance scale unless told otherwise


@torch.no_grad()
def sample(transformer, x, prompt_embeds, negative_embeds, times: list[float], guidance: float, step,
           progress: bool = False, mesh=None) -> torch.Tensor:
    """The sampling loop of both reference models: from x at times[0] through each later time,
    `step(x, prediction, t, t_next)` giving the next x. Each step calls the transformer on the
    prompt (cond), then on `negative_embeds` (uncond) unless `guidance` is 1, with one timestep
    tensor, each inside `transformer.cache_context(...)` when it has one, as diffusers'
    WanPipeline does; with a device `mesh` whose "cfg" dimension is 2, each half of the ranks
    runs one branch (`astraea.parallel.guidance`)."""
    batch, device, dtype = prompt_embeds.shape[0], prompt_embeds.device, prompt_embeds.dtype
    negative_embeds = negative_embeds.expand_as(prompt_embeds).contiguous()  # same strides: one compiled graph
    context = getattr(transformer, "cache_context", lambda name: contextlib.nullcontext())

    def predict(embeds):
        with context("cond" if embeds is prompt_embeds else "uncond"):
            out = transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds, return_dict=False)
        return out[0].float()

    for t, t_next in tqdm(list(zip(times, times[1:])), desc="steps", disable=not progress, leave=False):
        timestep = torch.full((batch,), t * 1000.0, device=device)
        if guidance == 1.0:
            prediction = predict(prompt_embeds)
        else:
            prediction = astraea.parallel.guidance(predict, prompt_embeds, negative_embeds, guidance, mesh)
        x = step(x, prediction, t, t_next)
    return x


@torch.no_grad()
def generate(
    transformer,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    num_steps: int = 20,
    guidance: float = GUIDANCE,
    seed: int = 0,
    progress: bool = False,
    mesh=None,
) -> torch.Tensor:
    """Clips [B, 3, FRAMES, SIZE, SIZE] in [-1, 1] by Euler steps of the flow from noise (t=1) to data (t=0).

    `transformer` is any callable with the diffusers Wan signature, a `torch.compile`d one
    too. Each step calls it on the prompt (cond), then on `negative_embeds` (uncond, the
    encoded empty prompt) unless `guidance` is 1, with the same timestep tensor, each inside
    `transformer.cache_context(...)` when it has one, as diffusers' WanPipeline does.
    The noise comes from `seed` on the CPU, so a seed gives the same clip on any device.
    With a device `mesh` whose "cfg" dimension is 2, each half of the ranks runs one branch
    (`astraea.parallel.guidance`).
    """
    batch, device = prompt_embeds.shape[0], prompt_embeds.device
    x = torch.randn(batch, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
    times = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
    step = lambda x, clean, t, t_next: torch.lerp(clean, x, t_next / t)  # x + (t_next - t) * velocity
    x = sample(transformer, x, prompt_embeds, negative_embeds, times, guidance, step, progress, mesh)
    return x.clamp(-1.0, 1.0)
