"""How close a sparse generation stays to the dense one on the same seeds.

Three views of one generation, each scored with PSNR, SSIM and relative L2:
- the final latent, what a pipeline hands to its decoder;
- the model's contribution, final latent minus initial noise: with random or weakly trained
  weights the noise dominates the final latent, and a latent PSNR would then mostly measure
  the noise both runs share, flattering any schedule;
- decoded frames, when a decoder is given or the generations decoded themselves (a pipeline's
  own output): what a person sees.
Videos are laid out (batch, channels, frames, height, width), as diffusers' video latents and
decoded videos are; latents packed as tokens (batch, tokens, channels), as LTX's pipelines keep
them, are compared as one frame of tokens by channels. SSIM is taken per frame over all
channels and averaged, as scikit-image's `structural_similarity` takes it by default (a 7x7
uniform window, sample covariance, the reference's range); the metrics run in float64 with torch
on the device the videos are on, since on the CPU they took longer than a GPU generation of a
Wan-sized clip (about 5 s for 33 frames at 480x832, with scikit-image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .workload import Trajectory

SSIM_WINDOW = 7


@dataclass(frozen=True)
class Fidelity:
    """psnr in dB (inf when identical), ssim in [-1, 1], rel_l2 = |test - ref| / |ref|."""

    psnr: float
    ssim: float
    rel_l2: float

    @classmethod
    def mean(cls, items: Sequence["Fidelity"]) -> "Fidelity":
        """Over seeds: SSIM and relative L2 averaged; PSNR of the mean error (each seed's MSE
        over its squared peak), not the mean of the dBs. Averaged dBs let a schedule pay for one
        ruined clip with a few perfect ones; the pooled error, like a batch's PSNR, does not."""
        errors = [10.0 ** (-f.psnr / 10.0) for f in items]  # MSE / peak^2, 0 for an identical run
        error = float(np.mean(errors))
        psnr = math.inf if error == 0.0 else -10.0 * math.log10(error)
        return cls(psnr, *(float(np.mean([getattr(f, k) for f in items])) for k in ("ssim", "rel_l2")))


@dataclass(frozen=True)
class FidelityReport:
    latent: Fidelity
    contribution: Fidelity
    decoded: Fidelity | None = None

    @classmethod
    def mean(cls, reports: Sequence["FidelityReport"]) -> "FidelityReport":
        """Each metric averaged over reports (over seeds)."""
        decoded = [r.decoded for r in reports]
        return cls(
            latent=Fidelity.mean([r.latent for r in reports]),
            contribution=Fidelity.mean([r.contribution for r in reports]),
            decoded=None if None in decoded else Fidelity.mean(decoded),
        )

    @property
    def score(self) -> float:
        """The one number a search maximises: PSNR of what a person sees when a decoder is
        given, else of the model's contribution."""
        return (self.decoded or self.contribution).psnr

    def to_json(self) -> dict:
        views = {"latent": self.latent, "contribution": self.contribution, "decoded": self.decoded}
        return {name: None if f is None else vars(f) for name, f in views.items()}

    @classmethod
    def from_json(cls, data: dict) -> "FidelityReport":
        return cls(**{name: None if f is None else Fidelity(**f) for name, f in data.items()})


def _video(x: torch.Tensor) -> torch.Tensor:
    video = x.detach().to(torch.float64)
    if video.ndim == 3:  # packed tokens [B, N, C]
        video = video[:, None, None]
    if video.ndim != 5:
        raise ValueError(
            f"fidelity expects videos as (batch, channels, frames, height, width) or packed latents as "
            f"(batch, tokens, channels), got shape {tuple(video.shape)}"
        )
    return video


def _range(reference: torch.Tensor) -> float:
    return float(reference.max() - reference.min())


def psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over the whole video; the peak is the reference's range."""
    test, reference = _video(test), _video(reference.to(test.device))
    mse = float(torch.mean((test - reference) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(_range(reference) ** 2 / mse)


def ssim(test: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity over frames (all channels of a frame together)."""
    test, reference = _video(test), _video(reference.to(test.device))
    height, width = reference.shape[-2:]
    # A latent is small: shrink the window to the frame, keeping it odd as SSIM needs.
    window = min(SSIM_WINDOW, height - (height % 2 == 0), width - (width % 2 == 0))
    if window < 3:
        raise ValueError(f"SSIM needs frames of at least 3x3, got {height}x{width}")
    data_range = _range(reference)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    unbiased = window * window / (window * window - 1.0)

    def mean(x):  # the local means of every window that lies wholly inside the frame
        return torch.nn.functional.avg_pool2d(x, window, stride=1)

    per_frame = []
    for f in range(reference.shape[2]):  # a frame at a time: a 480x832 clip's maps would take gigabytes at once
        x, y = reference[:, :, f].flatten(0, 1)[:, None], test[:, :, f].flatten(0, 1)[:, None]
        mx, my = mean(x), mean(y)
        vx, vy = unbiased * (mean(x * x) - mx * mx), unbiased * (mean(y * y) - my * my)
        vxy = unbiased * (mean(x * y) - mx * my)
        s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        per_frame.append(s.reshape(reference.shape[0], -1).mean(1))  # every channel of a sample's frame
    return float(torch.stack(per_frame).mean())


def relative_l2(test: torch.Tensor, reference: torch.Tensor) -> float:
    test, reference = _video(test), _video(reference.to(test.device))
    return float(torch.linalg.vector_norm(test - reference) / torch.linalg.vector_norm(reference))


def compare(test: torch.Tensor, reference: torch.Tensor) -> Fidelity:
    return Fidelity(psnr(test, reference), ssim(test, reference), relative_l2(test, reference))


def fidelity(
    tests: Sequence[Trajectory],
    references: Sequence[Trajectory],
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    decoded_references: Sequence[torch.Tensor] | None = None,
) -> FidelityReport:
    """Fidelity of sparse generations against dense ones on the same seeds, averaged over seeds.

    Frames a trajectory decoded itself are compared as they are; otherwise `decoder` decodes
    them. `decoded_references` spares decoding the same dense latents again for every candidate.
    """
    if len(tests) != len(references) or not tests:
        raise ValueError(f"need one dense reference per generation, got {len(tests)} and {len(references)}")

    def frames(run: Trajectory) -> torch.Tensor | None:
        if run.decoded is not None or decoder is None:
            return run.decoded
        with torch.no_grad():
            return decoder(run.latent)

    if decoded_references is None:
        decoded_references = [frames(r) for r in references]
    reports = []
    for i, (test, reference) in enumerate(zip(tests, references)):
        if not torch.equal(test.noise, reference.noise):
            raise ValueError("a generation and its reference start from different noise: they used different seeds")
        decoded = None
        if decoded_references[i] is not None:
            decoded = compare(frames(test), decoded_references[i])
        latent = compare(test.latent, reference.latent)
        reports.append(FidelityReport(latent, compare(test.contribution, reference.contribution), decoded))
    return FidelityReport.mean(reports)
