"""The trained reference models as the demo and the benchmarks use them, behind one interface.

- "reference" (v1, `model.py`): pixel space, 512 tokens, predicts the clean clip.
- "reference-v2" (`latent/`): diffusers' Wan VAE and Wan transformer, 2,304 latent tokens,
  predicts the flow-matching velocity as Wan does.

A subject gives its held-out evaluation prompts and the prompt a calibration seed draws, how
its sampler runs (what the transformer predicts, the time shift, the shape it samples, how a
sample becomes a clip), generates decoded clips [N, 3, F, H, W] in [-1, 1] with any callable of
the diffusers Wan signature (the transformer itself, or a compiled or sparse one), and checks
clips against their prompts with its own analytic checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import evaluate as pixel
from .data import FRAMES, SIZE, sample_scenes as pixel_scenes
from .latent import evaluate as latent
from .latent.autoencoder import decode, latent_shape
from .latent.checks import check_clip as latent_check
from .latent.model import GUIDANCE as LATENT_GUIDANCE, SHIFT as LATENT_SHIFT, load_latent_reference
from .latent.scenes import sample_scenes as latent_scenes
from .model import GUIDANCE as PIXEL_GUIDANCE, load_reference

SUBJECTS = ("reference", "reference-v2")


class PixelReference:
    """Reference model v1."""

    name = "reference"
    card = "MODEL_CARD.md"  # in astraea/assets: how it was trained, how often dense clips pass the checks
    prediction = "sample"  # the clean clip
    shift = 1.0  # an even time grid

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.transformer, self.encoder = load_reference(device=device, dtype=dtype)
        self.guidance = PIXEL_GUIDANCE

    def prompts(self, count: int) -> list:
        return pixel.evaluation_prompts(count)

    def prompt(self, seed: int):
        """The prompt of a calibration seed (the scene `seed` draws)."""
        return pixel_scenes(np.random.default_rng(seed), 1).prompts()[0]

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) the transformer samples: the clip itself."""
        return 3, FRAMES, SIZE, SIZE

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space: the clip a person sees is the final sample clamped to [-1, 1]."""
        return x.clamp(-1.0, 1.0)

    def generate(self, model, prompts: list, steps: int, guidance: float | None = None, seed: int = 0,
                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        guidance = self.guidance if guidance is None else guidance
        return pixel.generate_clips(model, self.encoder, prompts, steps, guidance, seed, batch_size, progress)

    def score(self, clips: torch.Tensor, prompts: list) -> dict[str, float]:
        return pixel.score(clips, prompts)


class LatentReference:
    """Reference model v2; `path` loads a weights file other than the shipped one, unchecked."""

    name = "reference-v2"
    card = "MODEL_CARD_v2.md"
    prediction = "velocity"
    shift = LATENT_SHIFT

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 path: str | Path | None = None):
        checked = {} if path is None else {"path": path, "expected_sha256": None}
        self.vae, self.transformer, self.encoder = load_latent_reference(device, dtype, **checked)
        self.guidance = LATENT_GUIDANCE

    def prompts(self, count: int) -> list:
        return latent.evaluation_prompts(count)

    def prompt(self, seed: int):
        """The prompt of a calibration seed (the scene `seed` draws)."""
        return latent_scenes(np.random.default_rng(seed), 1).prompts()[0]

    def latent_shape(self) -> tuple[int, int, int, int]:
        """(channels, frames, height, width) the transformer samples: the VAE's latents of a clip."""
        return latent_shape(dict(self.vae.config))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The clip the VAE decodes from normalised latents."""
        return decode(self.vae, x)

    def generate(self, model, prompts: list, steps: int, guidance: float | None = None, seed: int = 0,
                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        guidance = self.guidance if guidance is None else guidance
        return latent.generate_clips(model, self.vae, self.encoder, prompts, steps, guidance, seed, batch_size, progress)

    def score(self, clips: torch.Tensor, prompts: list) -> dict[str, float]:
        return pixel.score(clips, prompts, latent_check)


def load_subject(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 path: str | Path | None = None):
    """The reference model called `name`; `path` (v2 only) names a weights file to load unchecked."""
    if name == "reference":
        if path is not None:
            raise ValueError("a weights path is only taken for reference-v2")
        return PixelReference(device, dtype)
    if name == "reference-v2":
        return LatentReference(device, dtype, path)
    raise ValueError(f"unknown reference model {name!r}; known: {', '.join(SUBJECTS)}")
