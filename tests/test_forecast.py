"""Forecast reuse: the tokens a block does not recompute get their contribution extrapolated
from its last two computations (`astraea/runtime/forecast.py`)."""

import pytest
import torch

import astraea
from astraea import ConfigError
from astraea.schedule import Schedule, ScheduleError
from astraea.runtime import forecast
from astraea.runtime.select import mark_selected
from astraea.runtime.state import BlockState
from tests.contract import ContractChecker
from tests.models import sample, wan

B, N, D = 2, 12, 4


def _run(contribution, selections, samples, modes=None):
    """Drive one block's state as the runner does, with the real merge op: step 0 fills the
    cache, later steps recompute the rows `selections[s]` ([S, K]; None for a skipped step,
    which the merge serves with no rows, as the skip graph does), keeping the slopes and
    forecasting where `modes[s]` says so (every step by default). Returns, per step, what the
    merge gave the rows it did not recompute, and their true contribution."""
    state = BlockState.allocate((B, N, D), torch.float32, "cpu", samples)
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(0))
    every = torch.arange(N).expand(samples, -1).contiguous()
    read = []
    for step, idx in enumerate(selections):
        fresh = contribution(step)
        forecasting = step > 0 and (modes is None or modes[step] == "forecast")
        if step > 0:
            forecast.allocate([state])
        if idx is None:
            idx = torch.empty(samples, 0, dtype=torch.long)
            state.stale.add_(1)
        elif step == 0:
            idx = every
        span = forecast.span(state, idx) if step > 0 else None
        if idx.shape[1]:
            mark_selected(state, idx)
        reused = torch.ones(B, N, dtype=torch.bool).scatter_(1, idx.expand(B, -1), False)
        at = (torch.arange(B)[:, None], idx.expand(B, -1))
        rows = (x[at] + fresh[at]).contiguous()
        slopes = (state.slope, state.stale, span, forecasting) if step > 0 else (None, None, None)
        y = torch.ops.astraea.merge_rows(x, rows, idx, state.cache, state.change, None, state.lse, *slopes)
        read.append(((y - x)[reused], fresh[reused], reused))
    return read


def _selections(samples, steps, k=5, skips=(4, 7)):
    g = torch.Generator().manual_seed(1)
    chosen = [None] * steps
    for s in range(steps):
        if s not in skips:
            chosen[s] = torch.stack([torch.randperm(N, generator=g)[:k].sort().values for _ in range(samples)])
    every = torch.arange(N).expand(samples, -1).contiguous()
    chosen[1] = every  # a second dense step: every slope known
    if steps > 6:
        chosen[6] = every  # a dense step over tokens of different staleness (the slopes' whole-tensor path)
    return chosen


@pytest.mark.parametrize("samples", [1, B], ids=["one selection for the batch", "one per sample"])
def test_a_contribution_linear_in_the_step_is_forecast_exactly(samples):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    read = _run(lambda s: a + b * s, _selections(samples, 10), samples)
    for step, (cache, true, _) in enumerate(read[2:], start=2):  # partial and skipped steps alike
        torch.testing.assert_close(cache, true, rtol=1e-5, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("samples", [1, B], ids=["one selection for the batch", "one per sample"])
def test_two_equal_contributions_forecast_as_a_copy(samples):
    c = torch.randn(B, N, D, generator=torch.Generator().manual_seed(3))
    read = _run(lambda s: c, _selections(samples, 8), samples)
    for cache, true, _ in read[1:]:  # the merge stores rows - x: equal up to its rounding
        torch.testing.assert_close(cache, true, rtol=1e-6, atol=1e-6)


def test_steps_that_copy_between_steps_that_forecast_keep_the_slopes():
    """Per-step reuse: a copying step reads each token's last computed contribution, and a
    forecasting step after copying ones is still exact on a linear contribution."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    selections = _selections(B, 10)
    modes = ["copy", "copy", "forecast", "copy", "forecast", "copy", "copy", "forecast", "forecast", "copy"]
    read = _run(lambda s: a + b * s, selections, B, modes)
    last = torch.zeros(B, N)  # the step each token was last computed at
    for step, ((cache, true, reused), idx) in enumerate(zip(read, selections)):
        if step >= 2 and modes[step] == "forecast":
            torch.testing.assert_close(cache, true, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        elif step >= 1:
            copied = (a + b * last[..., None])[reused]
            torch.testing.assert_close(cache.reshape(copied.shape), copied, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        if idx is not None or step == 0:
            chosen = torch.arange(N).expand(B, -1) if idx is None else idx.expand(B, -1)
            last.scatter_(1, chosen, float(step))


def test_a_contribution_that_is_not_linear_is_not_forecast_exactly():
    """The check can fail: a quadratic contribution is missed by the tokens' linear forecast."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    read = _run(lambda s: a + b * s * s, _selections(1, 8), 1)
    assert not torch.allclose(read[5][0], read[5][1], atol=1e-3)


def test_switching_reuse_recompiles_nothing_and_recomputed_rows_keep_the_contract():
    torch._dynamo.reset()
    family = wan()
    schedule = [1.0, 1.0, 0.5, 0.0, 0.25, 0.5]
    be = astraea.backend(schedule=schedule, reuse="forecast")
    compiled = torch.compile(family.model, backend=be)
    forecast_out = sample(family, compiled, steps=6)
    runner = be.runners[0]
    slopes = [s.slope for s in runner.branches[0].blocks]
    assert all(s is not None for s in slopes)
    cache = sum(s.cache.numel() * s.cache.element_size() for b in runner.branches.values() for s in b.blocks)
    assert runner.cache_bytes() >= 2 * cache  # the slopes count: one more cache-sized tensor per block and branch

    # the contract: the selected rows equal the dense block, the others are x plus the forecast; a
    # generation's first call runs the copying graph, the others the forms that keep the slopes
    graph_fn, lower_slopes = runner.graph_fn, runner.lower_slopes
    checkers = {"first": ContractChecker(runner)}
    runner.graph_fn = checkers["first"]
    runner.lower_slopes = lambda forecasts: checkers.setdefault(forecasts, ContractChecker(runner, lower_slopes(forecasts)))
    torch.testing.assert_close(sample(family, compiled, steps=6), forecast_out)
    calls = {name: c.checked // be.reports[0].num_sparse_blocks for name, c in checkers.items()}
    assert calls == {"first": 2, False: 2, True: 6}  # per branch: the first call, a dense one, three forecasting
    runner.graph_fn, runner.lower_slopes = graph_fn, lower_slopes

    be.update(reuse="copy")
    copy_out = sample(family, compiled, steps=6)
    be.update(reuse="forecast")
    again = sample(family, compiled, steps=6)
    assert len(be.reports) == 1  # one compile served both
    torch._dynamo.reset()
    copied = sample(family, torch.compile(family.model, backend=astraea.backend(schedule=schedule)), steps=6)
    torch.testing.assert_close(copy_out, copied)
    torch.testing.assert_close(again, forecast_out)
    assert not torch.allclose(forecast_out, copy_out)



def test_a_schedule_says_the_reuse_of_each_step_and_switching_it_recompiles_nothing():
    torch._dynamo.reset()
    family = wan()
    budgets = (1.0, 1.0, 0.5, 0.0, 0.25, 0.5)
    be = astraea.backend(schedule=Schedule(budgets=budgets, reuse=("copy",) * 6))
    compiled = torch.compile(family.model, backend=be)
    copy_out = sample(family, compiled, steps=6)
    assert be.runners[0].branches[0].blocks[0].slope is None  # no step forecasts: no slopes kept
    be.update(reuse="copy", schedule=Schedule(budgets=budgets, reuse=("forecast",) * 6))
    all_forecast = sample(family, compiled, steps=6)
    be.update(schedule=budgets, reuse="forecast")
    torch.testing.assert_close(all_forecast, sample(family, compiled, steps=6))
    be.update(schedule=Schedule(budgets=budgets, reuse=("copy",) * 6))  # the schedule's mode wins over the option
    torch.testing.assert_close(sample(family, compiled, steps=6), copy_out)
    mixed = ("copy", "copy", "copy", "forecast", "copy", "forecast")  # forecast the skip and the last step only
    be.update(schedule=Schedule(budgets=budgets, reuse=mixed), reuse="copy")
    mixed_out = sample(family, compiled, steps=6)
    assert len(be.reports) == 1  # one compile served every mode
    for other in (copy_out, all_forecast):
        assert not torch.allclose(mixed_out, other)
    # forecasting the step-3 skip alone changes the run
    be.update(schedule=Schedule(budgets=budgets[:4], reuse=mixed[:4]))
    assert not torch.allclose(sample(family, compiled, steps=4), sample_copy(family, budgets[:4]))


def sample_copy(family, budgets):
    torch._dynamo.reset()
    return sample(family, torch.compile(family.model, backend=astraea.backend(schedule=list(budgets))), steps=len(budgets))


def test_a_schedules_reuse_is_checked_and_kept_in_its_file(tmp_path):
    schedule = Schedule(budgets=(1.0, 0.0, 0.5), reuse=("copy", "forecast", "copy"), times=(999.0, 500.0, 10.0))
    schedule.save(tmp_path / "s.json")
    loaded = Schedule.load(tmp_path / "s.json")
    assert loaded.reuse == schedule.reuse and loaded.step_reuse(1, 400.0) == "forecast"
    assert loaded.step_reuse(7, 20.0) == "forecast" and loaded.step_reuse(0, 2000.0) == "copy"  # on the time axis
    assert Schedule(budgets=(1.0, 0.5)).step_reuse(1) is None  # the backend option decides
    with pytest.raises(ScheduleError, match="one mode per budget"):
        Schedule(budgets=(1.0, 0.5), reuse=("copy",))
    with pytest.raises(ScheduleError, match="one mode per budget"):
        Schedule(constant=0.5, reuse=("copy",))
    with pytest.raises(ScheduleError, match="must be among"):
        Schedule(budgets=(1.0, 0.5), reuse=("copy", "taylor"))
    with pytest.raises(ConfigError, match="float8_e4m3fn caches cannot"):
        astraea.backend(schedule=Schedule(budgets=(1.0, 0.0), reuse=("copy", "forecast")), cache_dtype="float8_e4m3fn")


def test_budget_one_with_forecast_equals_dense():
    torch._dynamo.reset()
    family = wan()
    dense = sample(family, family.model, steps=4)
    out = sample(family, torch.compile(family.model, backend=astraea.backend(schedule=1.0, reuse="forecast")), steps=4)
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_bad_reuse_options_are_refused():
    with pytest.raises(ConfigError, match="'reuse' must be one of"):
        astraea.backend(reuse="taylor")
    with pytest.raises(ConfigError, match="float8_e4m3fn caches cannot"):
        astraea.backend(reuse="forecast", cache_dtype="float8_e4m3fn")


def test_the_evaluator_scores_a_schedule_again_under_other_options():
    """Scores are kept per set of backend options: switching reuse scores the schedule anew."""
    from astraea.search import Evaluator, SparseModel, random_wan

    torch._dynamo.reset()
    workload = random_wan("tiny", frames=3, height=8, width=8, num_steps=6)
    sparse = SparseModel(workload)
    evaluator = Evaluator(workload, sparse)
    budgets = (1.0, 1.0, 0.5, 0.0, 0.0, 0.5)
    copied = evaluator(budgets, [0])
    sparse.update(reuse="forecast")
    forecast_report = evaluator(budgets, [0])
    assert evaluator.generations == 2 and forecast_report.score != copied.score
    sparse.update(reuse="copy")
    assert evaluator(budgets, [0]) == copied and evaluator.generations == 2


def test_a_schedule_forecasts_only_where_a_step_recomputes_less_than_every_token():
    assert not Schedule(budgets=(1.0, 1.0), reuse=("forecast", "forecast")).forecasts()  # keeps no slopes for nothing
    assert Schedule(budgets=(1.0, 0.5), reuse=("copy", "forecast")).forecasts()
    assert not Schedule(budgets=(1.0, 0.5), reuse=("forecast", "copy")).forecasts()
    # Steps with no mode of their own take the backend's option.
    assert Schedule(budgets=(1.0, 0.0)).forecasts("forecast") and not Schedule(budgets=(1.0, 0.0)).forecasts()
    assert Schedule(constant=0.5).forecasts("forecast") and not Schedule(constant=1.0).forecasts("forecast")


def test_the_forecast_option_keeps_slopes_only_where_a_step_can_forecast():
    from astraea.config import AstraeaConfig

    dense = AstraeaConfig(schedule=Schedule(constant=1.0), reuse="forecast", cache_dtype="float8_e4m3fn")
    assert not dense.forecasts  # nothing to forecast, so the float8 caches are fine
    with pytest.raises(ConfigError, match="float8_e4m3fn caches cannot"):
        dense.replace(schedule=Schedule(constant=0.5))
    assert AstraeaConfig(schedule=Schedule(constant=0.5), reuse="forecast").forecasts
