"""Schedules on the sampler's time axis: a step takes the budget of the searched step whose
time span holds it, so one schedule runs at any step count; files of several named schedules."""

import json

import pytest
import torch

import astraea
from astraea import Schedule, ScheduleError
from astraea.schedule import save_schedules
from tests.models import sample, wan

TIMED = Schedule(budgets=(1.0, 0.5, 0.0, 0.25), times=(1000.0, 750.0, 500.0, 250.0))


@pytest.mark.parametrize("time, budget", [
    (1200.0, 1.0), (1000.0, 1.0), (800.0, 1.0), (750.0, 0.5), (750.00002, 0.5), (749.0, 0.5), (600.0, 0.5),
    (500.0, 0.0), (300.0, 0.0), (250.0, 0.25), (0.0, 0.25),
])
def test_a_step_takes_the_budget_of_the_span_holding_its_time(time, budget):
    assert TIMED.budget(0, time) == budget
    assert TIMED.budget(99, time) == budget  # the step index plays no part


@pytest.mark.parametrize("times, match", [
    ((1000.0, 750.0), "one time per budget"),
    ((1000.0, 1000.0, 500.0, 250.0), "strictly decreasing"),
    ((250.0, 500.0, 750.0, 1000.0), "strictly decreasing"),
    ((1000.0, float("nan"), 500.0, 250.0), "finite"),
    ((1000.0, "750", 500.0, 250.0), "finite"),
])
def test_bad_times_are_refused(times, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule(budgets=TIMED.budgets, times=times)


def test_a_constant_schedule_takes_no_times_and_a_timeless_call_is_refused():
    with pytest.raises(ScheduleError, match="one time per budget"):
        Schedule(constant=0.5, times=(1000.0,))
    with pytest.raises(ScheduleError, match="show no timestep"):
        TIMED.budget(0)


def test_files_of_version_1_and_2_and_of_several_schedules(tmp_path):
    path = tmp_path / "s.json"
    TIMED.save(path)
    assert Schedule.load(path).times == TIMED.times and json.loads(path.read_text())["version"] == 2
    old = {**Schedule(budgets=(1.0, 0.5)).to_json(), "version": 1}
    del old["times"]
    path.write_text(json.dumps(old))
    assert Schedule.load(path).budgets == (1.0, 0.5) and not Schedule.load(path).on_time_axis

    both = tmp_path / "pipeline.json"
    save_schedules(both, {"transformer": TIMED, "transformer_2": Schedule(constant=0.5)})
    assert Schedule.load(both, "transformer") == TIMED
    assert Schedule.coerce(f"{both}#transformer_2") == Schedule(constant=0.5)
    with pytest.raises(ScheduleError, match=r"one schedule per transformer: \['transformer', 'transformer_2'\]"):
        Schedule.load(both)
    with pytest.raises(ScheduleError, match="no schedule named 'vae'"):
        Schedule.coerce(f"{both}#vae")
    with pytest.raises(ScheduleError, match="not one named"):
        Schedule.load(path, "transformer")


def test_one_schedule_serves_other_step_counts():
    """Searched at 4 steps (timesteps 1000, 750, 500, 250 in `sample`), run at 4, 8 and 2: each
    step takes the budget of the searched step at or above its time; at 4 steps it is exactly
    the step-indexed schedule."""
    torch._dynamo.reset()
    family = wan()
    backend = astraea.backend(schedule=TIMED)
    compiled = torch.compile(family.model, backend=backend)
    expected = {4: [1.0, 0.5, 0.0, 0.25], 8: [1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.25, 0.25], 2: [1.0, 0.0]}
    outputs = {}
    for steps, budgets in expected.items():
        outputs[steps] = sample(family, compiled, steps=steps)
        records = backend.runners[0].records[-2 * steps:]
        assert [r.budget for r in records[::2]] == budgets
        assert [r.budget for r in records[1::2]] == budgets  # both guidance branches of a step
    torch._dynamo.reset()
    indexed = torch.compile(family.model, backend=astraea.backend(schedule=list(TIMED.budgets)))
    torch.testing.assert_close(outputs[4], sample(family, indexed, steps=4))
