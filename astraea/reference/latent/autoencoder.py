"""The autoencoder of reference model v2: diffusers' own `AutoencoderKLWan`, small.

Wan's causal 3D VAE compresses 8x in space and 4x in time (the first frame alone, then groups
of four), so a 33x256x256 clip becomes 9x32x32 latents; this is the real class in a narrow
configuration (base_dim 16, z_dim 16 as Wan 2.1), so encoding and decoding run through the
same chunked, feature-cached code path as Wan's. As in Wan, the diffusion model works on
latents normalised per channel, `(z - mean) / std`, and the statistics live in the VAE's own
config (`latents_mean`, `latents_std`), measured on the data after training.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from .scenes import FRAMES, SIZE

CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def latent_shape(config: dict = CONFIG, frames: int = FRAMES, size: int = SIZE) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) of the latents of a clip: each stage after the first
    halves the space, and each temporal downsampling halves the frames after the first."""
    spatial, temporal = 2 ** (len(config["dim_mult"]) - 1), 2 ** sum(config["temperal_downsample"])
    return config["z_dim"], (frames - 1) // temporal + 1, size // spatial, size // spatial


def build_autoencoder(config: dict = CONFIG) -> AutoencoderKLWan:
    """A fresh autoencoder with identity latent statistics; `config` may carry measured ones."""
    z = config["z_dim"]
    return AutoencoderKLWan(**{"latents_mean": [0.0] * z, "latents_std": [1.0] * z, **config})


def _stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def encode(vae: AutoencoderKLWan, clips: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, z, 9, 32, 32] of clips [B, 3, 33, 256, 256] (the posterior mean)."""
    z = vae.encode(clips.to(vae.dtype)).latent_dist.mode().float()
    mean, std = _stats(vae, z)
    return (z - mean) / std


def decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Clips in [-1, 1] of normalised latents, through diffusers' decode, as WanPipeline does."""
    mean, std = _stats(vae, latents.float())
    return vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0].float()


@torch.no_grad()
def fit_stats(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Store the per-channel mean and std of raw latents [N, z, f, h, w] in the VAE's config; return them normalised.

    `latents` are what `encode` gives while the statistics are still the identity.
    """
    flat = latents.transpose(0, 1).flatten(1).double()
    mean, std = flat.mean(1), flat.std(1).clamp(min=1e-6)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    shape = (1, -1, 1, 1, 1)
    return ((latents - mean.view(shape).to(latents)) / std.view(shape).to(latents)).to(latents.dtype)
