"""astraea inside real diffusers video pipelines, end to end: HunyuanVideo, CogVideoX, Wan 2.2 A14B
(two transformers, each with its own schedule) and LTX-2, at tiny random-weight configs, nothing
downloaded.

The pipelines are built in `tests/pipelines.py` (prompt embeddings in place of text encoders, the
smallest VAE each takes). The outputs compared are latents (`output_type="latent"`): astraea
changes only the transformer, and decoding would add time without adding a check.

Each pipeline runs twice: its transformers compiled whole (`torch.compile`), and block by block
(`astraea.compile_blocks`). One compilation per transformer serves three generations: at the sparse schedule (the generation
that compiles, as a user's first call is), at it again, and at budget 1.0 after `set_schedule`.
The tests check what those generations returned and what the runners recorded.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import astraea
from tests.pipelines import cogvideox, hunyuan_video, ltx2, wan22_a14b

STEPS = 4
CLOSE = 0.2  # sparse vs dense latents, relative: measured 0.007-0.013, CogVideoX 0.117 (budget 0.25 at its last step); in tests/test_pipeline.py another seed lands 1.36 away


@dataclass(frozen=True, eq=False)  # hashed by identity: pytest groups the tests of a case by it
class Case:
    name: str
    build: Callable  # () -> (pipeline, the keyword arguments of its call)
    schedules: dict  # transformer attribute -> its sparse schedule (1.0 where it starts: nothing cached)
    steps: dict  # transformer attribute -> the steps it denoises
    calls: int  # transformer calls per step: 2 for cond and uncond calls, 1 for CFG batched in one
    blockwise: bool = False  # compiled with astraea.compile_blocks, not torch.compile


WHOLE = [
    Case("hunyuan_video", hunyuan_video, {"transformer": [1.0, 1.0, 0.5, 0.5]}, {"transformer": (0, 1, 2, 3)}, 2),
    Case("cogvideox", cogvideox, {"transformer": [1.0, 1.0, 0.5, 0.25]}, {"transformer": (0, 1, 2, 3)}, 1),
    Case(
        "wan22_a14b", wan22_a14b,
        # unlike budgets at the steps each transformer does not run: a schedule read at the other's
        # steps shows in the records
        {"transformer": [1.0, 0.5, 0.75, 0.75], "transformer_2": [1.0, 0.75, 1.0, 0.25]},
        {"transformer": (0, 1), "transformer_2": (2, 3)}, 2,
    ),
    # video and audio streams, each with its text; audio-to-video and video-to-audio attention
    Case("ltx2", ltx2, {"transformer": [1.0, 1.0, 0.5, 0.5]}, {"transformer": (0, 1, 2, 3)}, 1),
]
# The same pipelines with each transformer's blocks compiled on their own
CASES = WHOLE + [dataclasses.replace(c, name=f"{c.name}_blocks", blockwise=True) for c in WHOLE]


def cases(selection):
    """Parametrize `run` over `selection`; each case is built and generated once for the module."""
    return pytest.mark.parametrize("run", selection, indirect=True, ids=[c.name for c in selection], scope="module")


# --- Running them ----------------------------------------------------------------------------------


@dataclass
class Run:
    """What one case's generations returned and recorded."""

    case: Case
    backends: dict  # transformer attribute -> its astraea backend
    eager: torch.Tensor
    sparse: list  # the two generations at the sparse schedules
    dense: torch.Tensor  # the generation at budget 1.0
    calls: list  # per generation: transformer attribute -> its runners' (step, context, budget, tokens)
    compiled: dict  # transformer attribute -> graphs its backend had compiled at the end of each step
    warned: list  # the AstraeaWarnings, as text


def _latents(out) -> torch.Tensor:
    """A generation's latents, flat: the video's, and the audio's where the pipeline makes audio."""
    return torch.cat([t.flatten() for t in (out.frames, getattr(out, "audio", None)) if t is not None])


def _generate(pipe, inputs, on_step=None) -> torch.Tensor:
    """One generation, from the same noise every time."""
    out = pipe(
        **inputs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent",
        callback_on_step_end=on_step,
    )
    return _latents(out)


def _video_runners(be) -> list:
    """The runners that select: every runner of a whole-model compile; under compile_blocks, those
    of the block graphs over the video's tokens."""
    return [r for r in be.runners if be.clock is None or r.report.num_tokens == be.clock.tokens]


def _calls(be) -> list:
    """Every transformer call the backend placed so far, as its runners recorded it (none where it
    left the graph dense: no runner); under compile_blocks, as its first video block did."""
    runners = _video_runners(be)[:1] if be.clock is not None else be.runners
    return [(r.step, r.branch, r.budget, r.tokens) for runner in runners for r in runner.records]


def _relative(a, b) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def run(request):
    """The case's pipeline, eager, then compiled (each transformer with its own backend) for two
    generations at the sparse schedules and one at budget 1.0."""
    case = request.param
    torch._dynamo.reset()
    pipe, inputs = case.build()
    pipe.set_progress_bar_config(disable=True)
    eager = _generate(pipe, inputs)
    if case.blockwise:
        backends = {name: astraea.compile_blocks(getattr(pipe, name), schedule=s) for name, s in case.schedules.items()}
    else:
        backends = {name: astraea.backend(schedule=schedule) for name, schedule in case.schedules.items()}
        for name, be in backends.items():
            setattr(pipe, name, torch.compile(astraea.attach(getattr(pipe, name)), backend=be))
    compiled = {name: [] for name in backends}

    def count(_pipe, step, t, tensors):  # every (re)compile dynamo makes goes through the backend
        for name, be in backends.items():
            compiled[name].append(len(be.reports))
        return {}

    done = {name: 0 for name in backends}
    calls = []

    def generate():
        latents = _generate(pipe, inputs, count)
        calls.append({name: _calls(be)[done[name]:] for name, be in backends.items()})
        done.update({name: len(_calls(be)) for name, be in backends.items()})
        return latents

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", astraea.AstraeaWarning)
        sparse = [generate(), generate()]
        for be in backends.values():
            be.set_schedule(1.0)
        dense = generate()
    warned = [str(w.message) for w in caught if issubclass(w.category, astraea.AstraeaWarning)]
    yield Run(case, backends, eager, sparse, dense, calls, compiled, warned)
    torch._dynamo.reset()


def _expected(case: Case, name: str) -> list:
    """(step, context, budget) of every call of transformer `name` in one generation at its schedule."""
    schedule = case.schedules[name]
    return [(step, context, schedule[step]) for step in case.steps[name] for context in range(case.calls)]


# --- The checks -------------------------------------------------------------------------------------


@cases(CASES)
def test_budget_one_equals_eager(run):
    """After `set_schedule(1.0)` every call is dense, and the pipeline gives what it gives eager."""
    error = _relative(run.dense, run.eager)
    assert error <= 1e-5, f"{run.case.name}: budget 1.0 differs from eager, relative error {error:.3g}"
    recorded = [call for calls in run.calls[2].values() for call in calls]
    assert all(budget == 1.0 for _, _, budget, _ in recorded), recorded  # set_schedule(1.0) reached every runner


@cases(CASES)
def test_every_block_goes_sparse(run):
    """What `astraea.explain` would say, from the analysis the backend ran on the pipeline's own
    inputs: a model that runs dense here, wholly or in part, fails."""
    for name, be in run.backends.items():
        assert be.reports and _video_runners(be), f"{name}: astraea compiled nothing sparse"
        # under compile_blocks a graph with no block (a module list of other parts) runs as traced
        for report in (r for r in be.reports if be.clock is None or r.num_blocks):
            assert 0 < report.num_sparse_blocks == report.num_blocks, f"{name}:\n{report}\n{run.warned}"


@cases(CASES)
def test_sparse_schedule_runs_each_transformers_budgets(run):
    """Each transformer runs its own schedule at the steps it denoises (for Wan 2.2 the boundary
    splits them), in the generation that compiles as in the next; the result moves away from dense
    but stays close to it."""
    for name, be in run.backends.items():
        n = _video_runners(be)[0].report.num_tokens
        for i, generation in enumerate(run.calls[:2]):
            calls = generation[name]
            assert [c[:3] for c in calls] == _expected(run.case, name), f"{name}, generation {i + 1}: {calls}"
            assert all((tokens < n) == (budget < 1.0) for _, _, budget, tokens in calls), calls
    torch.testing.assert_close(run.sparse[1], run.sparse[0], rtol=0, atol=0)  # a generation starts afresh
    error = _relative(run.sparse[0], run.dense)
    assert 1e-4 < error < CLOSE, f"{run.case.name}: sparse vs dense relative error {error:.3g}"


@cases(CASES)
def test_no_recompiles_after_the_first_step(run):
    """Budgets change from step to step and generation to generation as data: each backend compiles
    in the first step its transformer runs and never again."""
    for name, counts in run.compiled.items():
        first = run.case.steps[name][0]
        assert counts[first] > 0 and set(counts[first:]) == {counts[first]}, f"{name}: graphs per step {counts}"
