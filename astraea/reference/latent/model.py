"""Reference model v2: diffusers' own WanTransformer3DModel on Wan-VAE latents, predicting velocity.

As in Wan, the transformer reads normalised latents [B, 16, 9, 32, 32] in patches of 1x2x2
(2,304 tokens of 64 values through a 192-wide residual stream: unlike v1's 384-value pixel
patches, a latent patch fits, so the model predicts the flow-matching velocity noise - x0
directly, as Wan does). The autoencoder, the transformer and the prompt encoder are saved in
one float16 safetensors file of under 16 MB (14.3 MB), shipped as
`astraea/assets/reference_latent.safetensors` and refused unless its sha256 is the one recorded
here. How it was trained and how well it does: `astraea/assets/MODEL_CARD_v2.md`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

from ..model import ASSETS, WeightsError, half_weights, load_weights, read_weights, ready, sample, sha256
from .autoencoder import decode, latent_shape
from .text import TEXT_DIM, PromptEncoder

CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=3,
    attention_head_dim=64,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=576,
    num_layers=6,
)
SHIFT = 3.0  # of the noise schedule, for training and sampling alike (Wan uses 3 to 5)
GUIDANCE = 4.0  # the sampler's classifier-free guidance scale unless told otherwise

WEIGHTS = ASSETS / "reference_latent.safetensors"
WEIGHTS_SHA256 = "9d04323b1223a5b99f60ef974b83388fdd58be366f732119f139a00d8756710a"


def build_transformer(config: dict = CONFIG) -> tuple[WanTransformer3DModel, PromptEncoder]:
    """A freshly initialised transformer and prompt encoder of the given configuration."""
    return WanTransformer3DModel(**config), PromptEncoder(config["text_dim"])


def shifted(t: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """Wan's time shift: spends more of the schedule at high noise, where layout is decided."""
    return shift * t / (1 + (shift - 1) * t)


def save_weights(path: str | Path, vae: AutoencoderKLWan, transformer, encoder, metadata: dict) -> str:
    """Write all three models in float16 to one safetensors file; returns its sha256. The same
    weights and metadata give the same file in any process: one metadata key (safetensors
    writes several in no fixed order), and no private diffusers config keys
    ("_use_default_values", a list in no fixed order)."""
    tensors = half_weights({"autoencoder": vae, "transformer": transformer, "text": encoder})
    configs = {name: {k: v for k, v in m.config.items() if not k.startswith("_")}
               for name, m in (("autoencoder", vae), ("transformer", transformer))}
    configs = json.loads(json.dumps(configs, default=list))  # frozen dicts and tuples to JSON
    save_file(tensors, str(path), metadata={"reference": json.dumps({"configs": configs, **metadata}, sort_keys=True)})
    return sha256(path)


def load_latent_reference(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path = WEIGHTS,
    expected_sha256: str | None = WEIGHTS_SHA256,
) -> tuple[AutoencoderKLWan, WanTransformer3DModel, PromptEncoder]:
    """The trained autoencoder, transformer and prompt encoder of a weights file, in eval mode.

    The shipped file is refused unless its sha256 is the recorded one; `expected_sha256=None`
    loads another file (a training run's) unchecked.
    """
    path = Path(path)
    tensors = read_weights(path, expected_sha256, "reference v2 weights", "astraea.reference.latent.train")
    with safe_open(str(path), "pt") as f:
        configs = json.loads((f.metadata() or {}).get("reference", "{}")).get("configs")
    if configs is None:
        raise WeightsError(f"{path} holds no model configurations: it is not a reference v2 weights file")
    vae = AutoencoderKLWan.from_config(configs["autoencoder"])
    transformer, encoder = build_transformer(configs["transformer"])
    load_weights(tensors, {"autoencoder": vae, "transformer": transformer, "text": encoder},
                 f"reference v2 weights {path}")
    ready(transformer, (vae, encoder), device, dtype)
    return vae, transformer, encoder


@torch.no_grad()
def generate(
    transformer,
    vae: AutoencoderKLWan,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    num_steps: int = 30,
    guidance: float = GUIDANCE,
    shift: float = SHIFT,
    seed: int = 0,
    progress: bool = False,
    mesh=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised latents [B, 16, 9, 32, 32] and decoded clips [B, 3, 33, 256, 256] in [-1, 1].

    Flow-matching Euler steps from noise (t=1) to data (t=0) over `num_steps` uniform steps
    of t, shifted by `shift` as Wan's FlowMatch schedulers do; the transformer's output is
    the velocity noise - x0, so a step is x += (t_next - t) * velocity.

    `transformer` is any callable with the diffusers Wan signature (a compiled or sparse one
    too). Each step calls it on the prompt (cond), then on `negative_embeds` (uncond, the
    encoded empty prompt) unless `guidance` is 1, with the same timestep tensor, each inside
    `transformer.cache_context(...)` when it has one, as diffusers' WanPipeline does.
    The noise comes from `seed` on the CPU, so a seed gives the same clip on any device.
    With a device `mesh` whose "cfg" dimension is 2, each half of the ranks runs one branch.
    """
    batch, device = prompt_embeds.shape[0], prompt_embeds.device
    x = torch.randn(batch, *latent_shape(dict(vae.config)), generator=torch.Generator().manual_seed(seed)).to(device)
    times = shifted(torch.linspace(1.0, 0.0, num_steps + 1), shift).tolist()
    step = lambda x, velocity, t, t_next: x + (t_next - t) * velocity
    x = sample(transformer, x, prompt_embeds, negative_embeds, times, guidance, step, progress, mesh)
    return x, decode(vae, x)
