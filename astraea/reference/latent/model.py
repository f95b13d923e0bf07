"""Reference model v2: diffusers' own WanTransformer3DModel on Wan-VAE latents, predicting velocity.

As in Wan, the transformer reads normalised latents [B, 16, 9, 32, 32] in patches of 1x2x2
(2,304 tokens of 64 values through a 192-wide residual stream: unlike v1's 384-value pixel
patches, a latent patch fits, so the model predicts the flow-matching velocity noise - x0
directly, as Wan does). The autoencoder, the transformer and the prompt encoder ship in one
float16 safetensors file of under 16 MB, refused unless its sha256 is the recorded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..model import WeightsError, sample, sha256
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

ASSETS = Path(__file__).resolve().parents[2] / "assets"
WEIGHTS = ASSETS / "reference_latent.safetensors"
WEIGHTS_SHA256: str | None = None  # the shipped file's; none ships yet (benchmarks/NOTES.md, "Reference v2")


def build_transformer(config: dict = CONFIG) -> tuple[WanTransformer3DModel, PromptEncoder]:
    """A freshly initialised transformer and prompt encoder of the given configuration."""
    return WanTransformer3DModel(**config), PromptEncoder(config["text_dim"])


def shifted(t: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """Wan's time shift: spends more of the schedule at high noise, where layout is decided."""
    return shift * t / (1 + (shift - 1) * t)


def save_weights(path: str | Path, vae: AutoencoderKLWan, transformer, encoder, metadata: dict) -> str:
    """Write all three models in float16 to one safetensors file; returns its sha256."""
    tensors = {f"autoencoder.{k}": v for k, v in vae.state_dict().items()}
    tensors |= {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    tensors |= {f"text.{k}": v for k, v in encoder.state_dict().items()}
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
    configs = {"autoencoder": dict(vae.config), "transformer": dict(transformer.config)}
    configs = json.loads(json.dumps(configs, default=list))  # frozen dicts and tuples to JSON
    # One metadata key: safetensors writes several in no fixed order, and the file's sha256 is its identity.
    save_file(tensors, str(path), metadata={"reference": json.dumps({"configs": configs, **metadata}, sort_keys=True)})
    return sha256(path)


def load_latent_reference(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str | Path = WEIGHTS,
    expected_sha256: str | None = WEIGHTS_SHA256,
) -> tuple[AutoencoderKLWan, WanTransformer3DModel, PromptEncoder]:
    """The trained autoencoder, transformer and prompt encoder, in eval mode.

    By default the weights shipped with astraea, refused unless their sha256 is the recorded
    one; `expected_sha256=None` loads another file (a fresh training run's) unchecked.
    """
    path = Path(path)
    if path == WEIGHTS and expected_sha256 is None and WEIGHTS_SHA256 is None:
        raise WeightsError("no reference v2 weights ship with this astraea yet; train them with "
                           "`python -m astraea.reference.latent.train` and load them with path=")
    if not path.is_file():
        raise WeightsError(f"reference v2 weights {path} not found; train them with "
                           "`python -m astraea.reference.latent.train`")
    if expected_sha256 is not None and (found := sha256(path)) != expected_sha256:
        raise WeightsError(
            f"reference v2 weights {path} have sha256 {found}, expected {expected_sha256}: "
            "the file is corrupt or not the one this astraea was released with; reinstall astraea"
        )
    with safe_open(str(path), "pt") as f:
        configs = json.loads((f.metadata() or {}).get("reference", "{}")).get("configs")
    if configs is None:
        raise WeightsError(f"{path} holds no model configurations: it is not a reference v2 weights file")
    tensors = load_file(str(path))
    vae = AutoencoderKLWan.from_config(configs["autoencoder"])
    transformer, encoder = build_transformer(configs["transformer"])
    for prefix, module in (("autoencoder.", vae), ("transformer.", transformer), ("text.", encoder)):
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise WeightsError(f"reference v2 weights {path} do not fit their configuration: {e}") from e
    vae.to(device, dtype)
    encoder.to(device, dtype)
    transformer.to(device)
    keep = set(transformer._keep_in_fp32_modules or ())  # as diffusers' from_pretrained does
    for name, param in transformer.named_parameters():
        param.data = param.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    for module in (vae, transformer, encoder):
        module.eval().requires_grad_(False)
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
