"""Step placement, table-driven: each case is a sequence of calls, each call what the caller
shows (the timestep; the pipeline's announcement, if any; whether the pipeline closed a
generation before it), and the (step, branch, new generation) placement expects for it.

The table runs through the pure function `place`, and through `Placement` with announcements
made by a real diffusers model's `cache_context` and its stateful-hook reset, as pipelines make
them; nothing is compiled."""

import pytest
import torch

from astraea.runtime.announced import listen
from astraea.runtime.placement import Announced, Placement, Seen, State, place
from astraea.schedule import Schedule, ScheduleError
from tests.models import wan

ANY_STEPS = Schedule(constant=1.0)

N = None  # no announcement


def call(t, announced=N, ended=False):
    """One call: timestep t (None: the model has none), announced as (step, name) or not,
    after the pipeline closed a generation or not."""
    return t, announced, ended


CASES = {
    "timesteps, two branches": (
        [call(900), call(900), call(800), call(800), call(700), call(700)],
        [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False), (2, 0, False), (2, 1, False)],
    ),
    "a timestep that jumps back up starts a generation": (
        [call(900), call(800), call(900), call(800)],
        [(0, 0, True), (1, 0, False), (0, 0, True), (1, 0, False)],
    ),
    "no timestep: every call is a step": (
        [call(None), call(None), call(None)],
        [(0, 0, True), (1, 0, False), (2, 0, False)],
    ),
    "announced: steps and branches by name, whatever the timestep": (
        [call(500, (0, "cond")), call(500, (0, "uncond")), call(500, (1, "cond")), call(500, (1, "uncond"))],
        [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False)],
    ),
    "announced, uncond first: branches numbered in order of appearance": (
        [call(500, (0, "uncond")), call(500, (0, "cond")), call(500, (1, "uncond"))],
        [(0, 0, True), (0, 1, False), (1, 0, False)],
    ),
    "announced: a pipeline that closed its generation starts the next at its step 0": (
        [call(500, (0, "cond")), call(500, (1, "cond")), call(500, (0, "cond"), ended=True), call(500, (1, "cond"))],
        [(0, 0, True), (1, 0, False), (0, 0, True), (1, 0, False)],
    ),
    "a listener attached after the first call: it joins the second's branch of the same step": (
        [call(900), call(900, (0, "uncond")), call(800, (1, "cond")), call(800, (1, "uncond"))],
        [(0, 0, True), (0, 1, False), (1, 0, False), (1, 1, False)],
    ),
    "a listener attached after the first call, a model first called at step 2 (Wan 2.2's second expert)": (
        [call(900), call(800, (3, "cond"))],
        [(2, 0, True), (3, 0, False)],
    ),
    "announcements that stop: the timestep places the rest": (
        [call(900, (0, "cond")), call(800), call(700)],
        [(0, 0, True), (1, 0, False), (2, 0, False)],
    ),
}


def _as_expected(placed: list, moved: list) -> list:
    """The places as the table writes them: a late listener places the first call anew, once,
    from the second's announcement."""
    assert len(moved) <= 1
    first = [(moved[0].step, moved[0].branch, moved[0].new_generation)] if moved else placed[:1]
    return first + placed[1:]


@pytest.mark.parametrize("name", CASES)
def test_place(name):
    """The pure function, threading its state; the pipeline's "ended" flag stays up until read."""
    calls, expected = CASES[name]
    state, ended, placed, moved = State(), False, [], []
    for t, announced, closed in calls:
        ended = ended or closed
        seen = Seen(None if t is None else float(t), None if announced is None else Announced(*announced, 4), ended)
        result = place(state, seen)
        state, ended = result.state, ended and not result.read_ended
        placed.append((result.call.step, result.call.branch, result.call.new_generation))
        moved += [result.moved] if result.moved is not None else []
    assert _as_expected(placed, moved) == expected


@pytest.mark.parametrize("name", CASES)
def test_placement_hears_a_real_pipeline(name):
    calls, expected = CASES[name]
    model = wan().model
    placement = Placement(listen(model), lambda: ANY_STEPS)
    placed, moved = [], []
    for t, announced, ended in calls:
        if ended:
            model._reset_stateful_cache()
        timestep = None if t is None else float(t)
        if announced is None:
            result = placement.place(lambda: timestep)
        else:
            with model.cache_context(announced[1], step_index=announced[0], num_inference_steps=4):
                result = placement.place(lambda: timestep)
        placed.append((result.step, result.branch, result.new_generation))
        if placement.moved is not None:
            moved.append(placement.moved)
    assert _as_expected(placed, moved) == expected


def test_a_new_announced_generation_checks_the_step_count():
    """A step-indexed schedule shorter than the announced run refuses at its first call."""
    model = wan().model
    placement = Placement(listen(model), lambda: Schedule(budgets=(1.0,) * 29))
    with model.cache_context("cond", step_index=0, num_inference_steps=29):
        placement.place(lambda: 500.0)
    with pytest.raises(ScheduleError, match="29 steps but the run reached step 30"):
        with model.cache_context("cond", step_index=0, num_inference_steps=30):
            placement.place(lambda: 500.0)


def test_a_schedule_on_the_time_axis_reads_each_steps_time_once():
    """Announced steps leave the timestep unread, except at the first call of each step when the
    schedule follows time: both branches of a step carry that time, and a new generation reads
    again from its first step."""
    model = wan().model
    placement = Placement(listen(model), lambda: Schedule(budgets=(1.0, 0.5), times=(1000.0, 500.0)))
    reads, calls = [], []
    for generation in range(2):
        for step, t in enumerate((1000.0, 750.0, 500.0)):
            for name in ("cond", "uncond"):
                with model.cache_context(name, step_index=step, num_inference_steps=3):
                    calls.append(placement.place(lambda: reads.append(t) or t))
    assert [(c.step, c.branch, c.time) for c in calls[:6]] == [
        (0, 0, 1000.0), (0, 1, 1000.0), (1, 0, 750.0), (1, 1, 750.0), (2, 0, 500.0), (2, 1, 500.0)]
    assert calls[6].new_generation and calls[6].time == 1000.0
    assert reads == [1000.0, 750.0, 500.0] * 2


def test_an_announced_generation_does_not_read_the_timestep():
    """Reading a timestep on the GPU waits for it: once the announcements place a generation,
    the timestep is left unread (the first announced call still reads it, to tell a
    generation that begins announced from a listener that joined late)."""
    model = wan().model
    placement = Placement(listen(model), lambda: ANY_STEPS)
    reads = []

    def timestep():
        reads.append(1)
        return 500.0

    for step in range(3):
        for name in ("cond", "uncond"):
            with model.cache_context(name, step_index=step, num_inference_steps=3):
                placement.place(timestep)
    assert len(reads) == 1
