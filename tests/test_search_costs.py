"""Cost tables: predictions, the JSON round trip, and refusal anywhere they were not measured."""

import json

import pytest

from astraea.search.costs import (
    DEFAULT_LEVELS, CostKey, CostTable, CostTableError, Prediction, profiling_schedule,
)

KEY = CostKey(
    model="1b0ff5cd16ee2e65",
    shapes={"hidden_states": (1, 16, 21, 60, 104), "encoder_hidden_states": (1, 512, 4096)},
    dtype="bfloat16",
    options={"policy": "astraea", "group": "token", "cache_dtype": "auto", "skip": "blocks", "reuse": "copy"},
    device="NVIDIA H200",
    versions={"torch": "2.11.0", "triton": "3.6.0", "diffusers": "0.42.1", "astraea": "0.1.0"},
)
LATENCY = (0.05, 60.0, 110.0, 160.0, 215.0, 265.0, 320.0, 370.0, 420.0, 470.0, 525.0)


def table(**changes) -> CostTable:
    return CostTable(key=CostKey(**{**vars(KEY), **changes}), levels=DEFAULT_LEVELS, latency_ms=LATENCY)


def test_default_levels_are_exact_tenths():
    assert DEFAULT_LEVELS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def test_prediction_sums_steps_times_calls_per_step():
    t = table()
    assert t.predict([1.0, 0.5, 0.0, 0.3]) == pytest.approx(525.0 + 265.0 + 0.05 + 160.0)
    assert t.predict([1.0, 0.5, 0.0, 0.3], calls_per_step=2) == pytest.approx(2 * (525.0 + 265.0 + 0.05 + 160.0))
    with pytest.raises(CostTableError, match="budget 0.55 was not measured"):
        t.predict([1.0, 0.55])


def test_each_call_pays_the_overhead_around_it_skipped_ones_too():
    t = CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, call_overhead_ms=1.5)
    assert t.predict([1.0, 0.0], calls_per_step=2) == pytest.approx(2 * (525.0 + 1.5) + 2 * (0.05 + 1.5))
    assert t.step_ms(2)[5] == pytest.approx(2 * (265.0 + 1.5))
    assert t.call_ms(0.5) == 265.0  # the call's own time


def test_tables_without_the_overhead_still_load(tmp_path):
    data = CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, call_overhead_ms=2.0).to_json()
    assert data["call_overhead_ms"] == 2.0
    del data["call_overhead_ms"]
    assert CostTable.from_json(data).call_overhead_ms == 0.0


def test_tables_from_before_the_skip_option_measured_output_reuse():
    data = table().to_json()
    del data["key"]["options"]["skip"]
    assert CostTable.from_json(data).key.options["skip"] == "output"
    with pytest.raises(CostTableError, match="options"):
        CostTable.from_json(data).check(KEY)


def test_prediction_error_against_a_measured_run():
    p = table().prediction([1.0, 0.5], measured_ms=1000.0, calls_per_step=1)
    assert p.predicted_ms == pytest.approx(790.0)
    assert p.error == pytest.approx(0.21)
    assert "+21.0%" in str(p)
    assert Prediction(100.0, 80.0).error == pytest.approx(-0.25)


def test_round_trip(tmp_path):
    t = CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, call_overhead_ms=0.25, meta={"repeats": 3})
    path = tmp_path / "costs.json"
    t.save(path)
    loaded = CostTable.load(path, expect=KEY)
    assert loaded == t
    assert loaded.meta == {"repeats": 3}
    data = json.loads(path.read_text())
    assert data["format"] == "astraea-cost-table" and data["version"] == 1


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("model", "ffffffffffffffff", "model: 1b0ff5cd16ee2e65 vs ffffffffffffffff"),
        ("device", "NVIDIA A100-SXM4-80GB", "device: NVIDIA H200 vs NVIDIA A100-SXM4-80GB"),
        ("dtype", "float16", "dtype: bfloat16 vs float16"),
        ("options", {"policy": "random", "group": "token", "cache_dtype": "auto"}, "options:"),
        ("shapes", {"hidden_states": (1, 16, 21, 90, 160), "encoder_hidden_states": (1, 512, 4096)}, "shapes:"),
        ("versions", {**KEY.versions, "torch": "2.13.0"}, "versions:"),
    ],
)
def test_load_refuses_another_setting(tmp_path, field, value, shown):
    path = tmp_path / "costs.json"
    table().save(path)
    here = CostKey(**{**vars(KEY), field: value})
    with pytest.raises(CostTableError, match="measured for another setting") as error:
        CostTable.load(path, expect=here)
    assert shown in str(error.value)
    # Only the field that differs is named.
    others = {"model", "device", "dtype", "shapes", "options", "versions"} - {field}
    assert not any(f"{o}:" in str(error.value) for o in others)


def test_version_and_format_errors(tmp_path):
    path = tmp_path / "costs.json"
    data = table().to_json()
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(CostTableError, match="version 99; this astraea reads version 1"):
        CostTable.load(path)
    path.write_text(json.dumps({"budgets": [1.0]}))
    with pytest.raises(CostTableError, match="not an astraea cost table"):
        CostTable.load(path)
    path.write_text("{not json")
    with pytest.raises(CostTableError, match="corrupt"):
        CostTable.load(path)
    with pytest.raises(CostTableError, match="does not exist"):
        CostTable.load(tmp_path / "missing.json")


def test_table_needs_skip_and_dense_levels():
    with pytest.raises(CostTableError, match="levels 0 and 1"):
        CostTable(key=KEY, levels=(0.5, 1.0), latency_ms=(1.0, 2.0))


def test_profiling_schedule_visits_every_level_in_rounds_after_a_dense_step():
    budgets, measured, reuse = profiling_schedule((0.0, 0.5, 1.0), steps_per_level=2)
    assert budgets == (1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0) and reuse is None
    round_ = (None, (0.0, "copy"), (0.5, "copy"), (1.0, "copy"))
    assert measured == round_ * 2


def test_profiling_forecasting_visits_each_partial_level_in_both_modes():
    budgets, measured, reuse = profiling_schedule((0.0, 0.5, 1.0), steps_per_level=1, forecast=True)
    assert budgets == (1.0, 0.0, 0.0, 0.5, 0.5, 1.0)
    assert reuse == ("copy", "copy", "forecast", "copy", "forecast", "copy")
    assert measured == (None, (0.0, "copy"), (0.0, "forecast"), (0.5, "copy"), (0.5, "forecast"), (1.0, "copy"))


def test_a_table_with_forecasting_prices_each_step_by_its_mode_and_offers_both_to_a_search(tmp_path):
    forecast, slopes = tuple(ms + 2.0 for ms in LATENCY), tuple(ms + 1.0 for ms in LATENCY)
    t = CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, forecast_ms=forecast, slopes_ms=slopes)
    # One forecasting step: every step keeps the slopes, so the copying ones cost their `slopes_ms`.
    assert t.predict([1.0, 0.0, 0.5], reuse=["copy", "forecast", "copy"]) == pytest.approx(526.0 + 2.05 + 266.0)
    assert t.predict([1.0, 0.5], reuse=["forecast", "forecast"]) == pytest.approx(526.0 + 267.0)  # dense: no forecast
    # No forecasting step (a dense step's mode forecasts nothing): no slopes, the copying latencies.
    assert t.predict([1.0, 0.0], reuse=["forecast", "copy"]) == t.predict([1.0, 0.0]) == pytest.approx(525.05)
    levels, modes, ms, kept = t.choices(calls_per_step=2)
    assert len(levels) == 2 * len(DEFAULT_LEVELS) - 1 and levels[-1] == 1.0 and modes[-1] == "copy"
    assert (levels[:2], modes[:2], ms[:2], kept[:2]) == ((0.0, 0.0), ("copy", "forecast"), (0.1, 4.1), (2.1, 4.1))
    t.save(tmp_path / "t.json")
    loaded = CostTable.load(tmp_path / "t.json")
    assert (loaded.forecast_ms, loaded.slopes_ms) == (forecast, slopes)
    assert loaded.only((0, 1)).slopes_ms == (slopes[0], slopes[-1]) and loaded.copying() == table()
    with pytest.raises(CostTableError, match="no forecasting steps' latencies"):
        table().predict([1.0, 0.0], reuse=["copy", "forecast"])
    assert table().choices() == (DEFAULT_LEVELS, None, LATENCY, None)


def test_a_table_priced_before_copying_steps_kept_slopes_is_refused_with_the_remedy(tmp_path):
    data = CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, forecast_ms=LATENCY, slopes_ms=LATENCY).to_json()
    del data["slopes_ms"]
    with pytest.raises(CostTableError, match="profile --forecast"):
        CostTable.from_json(data)
    with pytest.raises(CostTableError, match="both the forecasting"):
        CostTable(key=KEY, levels=DEFAULT_LEVELS, latency_ms=LATENCY, forecast_ms=LATENCY)


def test_a_table_restricted_to_whole_steps_keeps_their_latencies_and_refuses_unmeasured_levels():
    whole = table().only((1, 0))
    assert whole.levels == (0.0, 1.0) and whole.latency_ms == (LATENCY[0], LATENCY[-1])
    assert whole.predict([1.0, 0.0, 1.0]) == table().predict([1.0, 0.0, 1.0])
    with pytest.raises(CostTableError, match="not measured"):
        whole.predict([0.5])
    with pytest.raises(CostTableError, match="not measured"):
        table().only((0.0, 0.55, 1.0))
    with pytest.raises(CostTableError, match="levels 0 and 1"):
        table().only((0.5, 1.0))
