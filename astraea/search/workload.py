"""One generation setting a schedule is searched for: a video transformer, the shape of its
inputs and the sampler that drives it, from a seed to a final latent.

The search runs the denoising loop itself rather than a whole pipeline: it needs to start a
generation part-way (from a saved latent, to share trajectory prefixes between candidates),
to see the latent entering every step, and to time each transformer call. The loop is
diffusers' flow-matching Euler sampler with classifier-free guidance, the one Wan,
HunyuanVideo and LTX use, calling the transformer as their pipelines do: keyword arguments,
`return_dict=False`, each guidance branch inside `transformer.cache_context("cond" |
"uncond")`. The model may predict the velocity (Wan) or the clean sample (the shipped
reference model); both give the same Euler step. A calibration seed picks the initial noise
and, through `conditioning`, the prompt embeddings.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .timing import wall_ms

PREDICTIONS = ("velocity", "sample")


def random_text(tokens: int, width: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Conditioning for a model without a text encoder: seeded random cond and uncond
    embeddings [1, tokens, width], drawn from a stream apart from the noise's."""

    def conditioning(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        # A CPU generator keeps only 32 bits of its seed: derive a hashed one, not an offset.
        g = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, 1)).generate_state(1)[0]))
        return torch.randn((1, tokens, width), generator=g), torch.randn((1, tokens, width), generator=g)

    return conditioning


@dataclass(frozen=True)
class Trajectory:
    """Where a generation started and where it ended, and what it decoded to when the sampler
    decodes (a pipeline's own generation)."""

    noise: torch.Tensor
    latent: torch.Tensor
    decoded: torch.Tensor | None = None

    @property
    def contribution(self) -> torch.Tensor:
        """What the model added to the noise: the part of the latent a schedule can change."""
        return self.latent - self.noise


class Workload:
    """A fixed generation setting, sampled by the search's own loop (`PipelineWorkload` samples
    with a diffusers pipeline's `__call__` instead; both offer what the search uses).

    model: a diffusers-style video transformer, called as
        `model(hidden_states=, timestep=, encoder_hidden_states=, return_dict=False)[0]`.
    latent_shape: (channels, frames, height, width) of one latent video.
    conditioning: seed -> (cond, uncond) prompt embeddings [1, tokens, width].
    prediction: what the model outputs, "velocity" (noise - data) or the clean "sample".
    guidance: classifier-free guidance scale; other than 1, every step calls the transformer twice.
    shift: the flow-matching timestep shift (Wan uses 3 to 5; 1 keeps the steps even).
    decoder: optional callable from latents to frames, for fidelity on what a person sees.
    batch: clips per generation. Seed s draws the noise of all of them, and clip i takes the
        conditioning of seed s * batch + i (at batch 1, seed s's own). A small model can leave a
        GPU idle at batch 1, where its costs say nothing of a batched run; the cost table
        records the batch in its shapes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        latent_shape: tuple[int, int, int, int],
        conditioning: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
        num_steps: int,
        prediction: str = "velocity",
        guidance: float = 5.0,
        shift: float = 1.0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch: int = 1,
    ):
        if num_steps < 1:
            raise ValueError(f"a generation needs at least one step, got num_steps={num_steps}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a whole number of clips, at least 1, got {batch!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.latent_shape = tuple(latent_shape)
        self.conditioning = conditioning
        self.num_steps = num_steps
        self.prediction = prediction
        self.guidance = guidance
        self.shift = shift
        self.dtype = dtype
        self.device = torch.device(device)
        self.decoder = decoder
        self.batch = batch

    # Generations can start part-way from a saved latent (candidates share prefixes).
    resumable = True

    @property
    def decodes(self) -> bool:
        """Whether fidelity can be scored on frames: there is a decoder."""
        return self.decoder is not None

    @property
    def calls_per_step(self) -> int:
        """Transformer calls per step: two with classifier-free guidance (cond and uncond)."""
        return 2 if self.guidance != 1.0 else 1

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Input shapes of one transformer call, as the cost table records them."""
        noise, cond, _ = self.inputs(0)
        return {"hidden_states": tuple(noise.shape), "encoder_hidden_states": tuple(cond.shape)}

    def inputs(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Initial noise (float32, drawn on the CPU so a seed means the same on any device)
        and the cond and uncond prompt embeddings of a seed, for each of its `batch` clips."""
        noise = torch.randn((self.batch, *self.latent_shape), generator=torch.Generator().manual_seed(seed))
        conds, unconds = zip(*(self.conditioning(seed * self.batch + i) for i in range(self.batch)))
        cond, uncond = torch.cat(conds), torch.cat(unconds)
        return (
            noise.to(self.device),
            cond.to(self.device, self.dtype),
            uncond.to(self.device, self.dtype),
        )

    def example_inputs(self, seed: int = 0) -> dict:
        """Keyword arguments of one transformer call (for `astraea.explain`)."""
        noise, cond, _ = self.inputs(seed)
        timestep = torch.full((self.batch,), 1000.0, device=self.device)
        return dict(
            hidden_states=noise.to(self.dtype), timestep=timestep, encoder_hidden_states=cond, return_dict=False
        )

    def step_times(self, num_steps: int | None = None) -> tuple[float, ...]:
        """The timestep of each step as the transformer receives it (a float32 tensor), where
        a schedule on the time axis places its budgets."""
        sigmas = self.sigmas(num_steps or self.num_steps)[:-1]
        return tuple(float(t) for t in (sigmas * 1000.0).to(torch.float32))

    def time_generation(self, transformer: Callable, seed: int, num_steps: int | None = None) -> float:
        """Milliseconds of one generation with `transformer`, until the device is done."""
        return wall_ms(lambda: self.generate(transformer, seed, num_steps=num_steps), self.device, repeats=1, warmup=0)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Noise levels from 1 to 0, shifted toward high noise as diffusers' flow-matching
        scheduler does for video models."""
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        return self.shift * s / (1 + (self.shift - 1) * s)

    @torch.no_grad()
    def generate(
        self,
        transformer: Callable,
        seed: int,
        *,
        num_steps: int | None = None,
        start: tuple[int, torch.Tensor] | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        decode: bool = True,
    ) -> Trajectory:
        """Run the sampler with `transformer` (the model itself, or a compiled or timed copy).

        num_steps: overrides the workload's step count (profiling runs short generations).
        start: (step, latent) to resume a generation at `step` from the latent entering it.
        on_step: called with (step, latent entering it) before every step.
        decode: ignored: this sampler returns latents, and fidelity decodes them with `decoder`
            where it scores frames (a pipeline's generation decodes itself).
        """
        num_steps = num_steps or self.num_steps
        noise, cond, uncond = self.inputs(seed)
        sigmas = self.sigmas(num_steps)
        first, latent = start if start is not None else (0, noise)
        for step in range(first, num_steps):
            if on_step is not None:
                on_step(step, latent)
            sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
            timestep = torch.full((self.batch,), sigma * 1000.0, device=self.device)
            out = self._call(transformer, "cond", latent, timestep, cond)
            if self.calls_per_step == 2:
                unconditional = self._call(transformer, "uncond", latent, timestep, uncond)
                out = unconditional + self.guidance * (out - unconditional)
            velocity = out if self.prediction == "velocity" else (latent - out) / sigma
            latent = latent + (sigma_next - sigma) * velocity
        return Trajectory(noise, latent)

    def _call(self, transformer, context, latent, timestep, text):
        # Pipelines name each guidance branch so per-branch caches stay apart; a plain
        # module without diffusers' cache mixin has no such branches to keep apart.
        scope = getattr(transformer, "cache_context", None)
        with scope(context) if scope is not None else contextlib.nullcontext():
            out = transformer(
                hidden_states=latent.to(self.dtype), timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]
        return out.float()
