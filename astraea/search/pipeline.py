"""A diffusers pipeline's own generation as the search's workload: the search scores schedules
on what the user runs (its scheduler, guidance, text encoders, step count, decoder), not on
the search's Euler loop.

A generation is one `pipe(...)` call. A seed picks the prompt (`prompts[seed % len(prompts)]`)
and the initial latents, drawn on the CPU from the seed and passed as `latents=`, so that the
dense reference and every candidate start from the same noise; the latents after the last step
come back through `callback_on_step_end`, the frames as the pipeline's output (`output_type="pt"`).
A first, dense generation (the probe) finds what the search needs to know: the latents' shape,
the steps at which the tuned transformer runs and the timestep of each (a pipeline with two
transformers gives each a part of the steps, as Wan 2.2 does), its calls per step, and the
inputs of one call (for the analysis and the cost table's key).

Only the tuned transformer is swapped for each generation; any other one runs as the pipeline
holds it. A run of a given length (profiling) gives every transformer slot the one being
measured, so that every step times it.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Any, Callable, Sequence

import torch

from ..blockwise import timestep_reader
from .workload import Trajectory

# Arguments of the pipeline call that the workload sets itself.
OWN_ARGUMENTS = ("latents", "generator", "num_inference_steps", "output_type", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs", "return_dict")


class PipelineError(ValueError):
    """A pipeline, prompts or call arguments the search cannot run."""


def transformer_names(pipe) -> list[str]:
    """The pipeline's transformer slots that hold a model ("transformer", "transformer_2", ...)."""
    return [name for name, component in pipe.components.items()
            if name.startswith("transformer") and isinstance(component, torch.nn.Module)]


def eager(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, under a `torch.compile` wrapper if there is one."""
    return getattr(module, "_orig_mod", module)


def prompt_arguments(prompts: Sequence[str | dict]) -> list[dict]:
    """Each prompt as pipeline arguments: a string is `prompt=`; a dict is passed as it is (a
    negative prompt, or prompt embeddings for a pipeline without its text encoders)."""
    if isinstance(prompts, (str, dict)) or not prompts:
        raise PipelineError("prompts must be a non-empty list of prompt strings or of dicts of pipeline arguments")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append({"prompt": p})
        elif isinstance(p, dict):
            out.append(dict(p))
        else:
            raise PipelineError(f"prompt {i} is a {type(p).__name__}; give a string or a dict of pipeline arguments")
        own = sorted(set(out[-1]) & set(OWN_ARGUMENTS))
        if own:
            raise PipelineError(f"prompt {i} sets {own}, which tuning sets itself")
    return out


class PipelineWorkload:
    """Generations of `pipe` at `num_inference_steps`, with the transformer in slot `name` swapped.

    `call_kwargs` go to every call (height, width, num_frames, guidance_scale, ...); `decode`
    scores decoded frames (else latents only).
    """

    resumable = False  # a pipeline call runs from its first step to its last

    def __init__(self, pipe, name: str, prompts: Sequence[str | dict], *, num_inference_steps: int,
                 decode: bool = True, call_kwargs: dict[str, Any] | None = None):
        if name not in transformer_names(pipe):
            raise PipelineError(f"the pipeline has no transformer {name!r}; it has {transformer_names(pipe)}")
        call_kwargs = dict(call_kwargs or {})
        own = sorted(set(call_kwargs) & set(OWN_ARGUMENTS))
        if own:
            raise PipelineError(f"{own} are set by tuning itself; leave them out of the pipeline arguments")
        if num_inference_steps < 1:
            raise PipelineError(f"a generation needs at least one step, got num_inference_steps={num_inference_steps}")
        self.pipe, self.name = pipe, name
        self.model = eager(getattr(pipe, name))
        self.prompts = prompt_arguments(prompts)
        self.num_inference_steps = num_inference_steps
        self.decode = decode
        self.call_kwargs = call_kwargs
        self.guidance = call_kwargs.get("guidance_scale")
        self.decoder = None
        self.dtype = next(self.model.parameters()).dtype
        self.device = next(self.model.parameters()).device
        self._probe()

    # ---- what the search reads ------------------------------------------------------------------
    def step_times(self, num_steps: int | None = None) -> tuple[float, ...]:
        """The timestep of each step the transformer runs, as it received it."""
        if num_steps not in (None, self.num_steps):
            raise PipelineError("a pipeline's step times are known at its own step count only")
        return self.times

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.example.items() if isinstance(v, torch.Tensor)}

    def example_inputs(self, seed: int = 0) -> dict:
        """The keyword arguments of the transformer's first call in the probe."""
        return dict(self.example)

    @property
    def decodes(self) -> bool:
        """Whether fidelity can be scored on frames: the generations decode themselves."""
        return self.decode

    @torch.no_grad()
    def generate(self, transformer: Callable, seed: int, *, num_steps: int | None = None, start=None,
                 on_step=None, decode: bool = True) -> Trajectory:
        """One pipeline call with `transformer` in the tuned slot (in every slot for a run of
        `num_steps` steps, as profiling asks for), decoded where `decode` and the workload decodes."""
        if start is not None or on_step is not None:
            raise PipelineError("a pipeline's generation cannot start part-way")
        return self._call(transformer, seed, num_steps, decode=decode and self.decode)[0]

    def time_generation(self, transformer: Callable, seed: int, num_steps: int | None = None) -> float:
        """Milliseconds of the denoising loop, from the transformer's first call to the end of
        the last step (text encoding and decoding are the same for every schedule, and left out)."""
        return self._call(transformer, seed, num_steps, decode=False)[1]

    # ---- the pipeline call ----------------------------------------------------------------------
    def _call(self, transformer, seed, num_steps, decode) -> tuple[Trajectory, float]:
        steps = num_steps or self.num_inference_steps
        slots = [self.name] if num_steps is None else transformer_names(self.pipe)
        noise = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(seed))
        clock = _Clock(transformer, self.device)
        final = {}

        def on_step_end(pipe, step, timestep, tensors):
            final["latents"] = tensors["latents"]
            if step == steps - 1:
                clock.stop()
            return {}

        kwargs = {
            **self.call_kwargs, **self.prompts[seed % len(self.prompts)], "num_inference_steps": steps,
            "latents": noise.to(self.device, self.latent_dtype), "generator": torch.Generator().manual_seed(seed),
            "output_type": "pt" if decode else "latent", "callback_on_step_end": on_step_end,
            "callback_on_step_end_tensor_inputs": ["latents"], "return_dict": True,
        }
        with swapped(self.pipe, {slot: clock for slot in slots}), _quiet(self.pipe):
            output = self.pipe(**kwargs)
        decoded = None
        if decode:
            frames = output.frames
            if not isinstance(frames, torch.Tensor) or frames.ndim != 5:
                raise PipelineError(f"the pipeline's output_type='pt' frames are not a video tensor "
                                    f"[batch, frames, channels, height, width]: {type(frames).__name__}")
            decoded = frames.float().transpose(1, 2)  # as fidelity reads videos: [B, C, F, H, W]
        # The frames stay on the device: the fidelity of a 480p clip takes seconds on a CPU, milliseconds there.
        return Trajectory(noise, final["latents"].float().cpu(), decoded), clock.ms

    def _probe(self) -> None:
        """One dense generation, watching the tuned transformer's calls and every step's end."""
        read_timestep = timestep_reader(self.model)
        signature = inspect.signature(self.model.forward)
        steps_done, calls = [0], []
        example, latents = {}, {}

        def before(module, args, kwargs):
            if not example:
                for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
                    kind = signature.parameters[name].kind
                    example.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
            calls.append((steps_done[0], None if read_timestep is None else read_timestep(args, kwargs)))

        def on_step_end(pipe, step, timestep, tensors):
            steps_done[0] = step + 1
            latents["shape"], latents["dtype"] = tuple(tensors["latents"].shape), tensors["latents"].dtype
            return {}

        handle = self.model.register_forward_pre_hook(before, with_kwargs=True)
        try:
            with swapped(self.pipe, {self.name: self.model}), _quiet(self.pipe), torch.no_grad():
                self.pipe(**self.call_kwargs, **self.prompts[0], num_inference_steps=self.num_inference_steps,
                          generator=torch.Generator().manual_seed(0), output_type="latent",
                          callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
        finally:
            handle.remove()
        if not calls:
            raise PipelineError(f"the pipeline never called {self.name} at {self.num_inference_steps} steps")
        if not latents:
            raise PipelineError("the pipeline never called callback_on_step_end with its latents")
        if any(t is None for _, t in calls):
            raise PipelineError(f"{type(self.model).__name__}.forward takes no timestep: its steps cannot be "
                                "placed on the sampler's time axis")
        steps = sorted({step for step, _ in calls})
        times = {step: t for step, t in reversed(calls)}  # each step's first call
        self.times = tuple(times[s] for s in steps)
        if any(a <= b for a, b in zip(self.times, self.times[1:])):
            raise PipelineError(f"the timesteps of {self.name}'s steps do not decrease: {self.times}")
        self.num_steps = len(steps)
        if len(calls) % self.num_steps:
            raise PipelineError(f"{self.name} was called {len(calls)} times over {self.num_steps} steps: "
                                "not the same number of calls at every step")
        self.calls_per_step = len(calls) // self.num_steps
        self.example = example
        self.latent_shape, self.latent_dtype = latents["shape"], latents["dtype"]


class _Clock:
    """Stands in for a transformer and notes when it was first called (the denoising loop's
    start); attribute access reaches the transformer, as the pipeline expects."""

    def __init__(self, transformer: Callable, device: torch.device):
        self.transformer, self.device = transformer, device
        self.started = self.ended = None

    def __call__(self, *args, **kwargs):
        if self.started is None:
            self._sync()
            self.started = time.perf_counter()
        return self.transformer(*args, **kwargs)

    def stop(self) -> None:
        self._sync()
        self.ended = time.perf_counter()

    @property
    def ms(self) -> float:
        return (self.ended - self.started) * 1e3

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __getattr__(self, name):
        return getattr(self.transformer, name)


@contextlib.contextmanager
def swapped(pipe, slots: dict[str, Callable]):
    """The pipeline with other transformers in `slots` for the duration. Set on the instance
    directly: the pipeline's own `__setattr__` would record them in its config as components."""
    before = {slot: pipe.__dict__[slot] for slot in slots}
    try:
        for slot, value in slots.items():
            object.__setattr__(pipe, slot, value)
        yield
    finally:
        for slot, value in before.items():
            object.__setattr__(pipe, slot, value)


@contextlib.contextmanager
def _quiet(pipe):
    """No progress bar of the pipeline's own per generation (the search shows its own)."""
    before = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = before
