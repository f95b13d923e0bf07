"""Profile and search on a tiny random Wan model through the real backend, API and CLI."""

import dataclasses
import json
import math
import statistics

import pytest
import torch

import astraea
from astraea.cli import main
from astraea.schedule import Schedule
from astraea.search import (
    Calibration, CostKey, CostTable, CostTableError, Evaluator, SearchError, SearchSettings, SparseModel, Target,
    fidelity, load_or_profile, profile, Space, random_wan, search,
)

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
SIZE = dict(frames=3, height=8, width=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workload():
    # Dynamo keeps at most 8 compilations of the Wan forward per process, whatever the
    # instance; start this module with none.
    torch._dynamo.reset()
    return random_wan("tiny", num_steps=6, **SIZE)


@pytest.fixture(scope="module")
def sparse(workload):
    return SparseModel(workload)


@pytest.fixture(scope="module")
def table(workload, sparse, tmp_path_factory):
    table = profile(workload, levels=LEVELS, steps_per_level=2, repeats=2, sparse=sparse)
    table.save(tmp_path_factory.mktemp("costs") / "costs.json")
    return table


def reachable(table, workload, share):
    """The speedup `share` of the way from dense to the fastest schedule `table` allows. The
    table is measured here, and on a loaded two-core machine a skipped step may cost two thirds
    of a dense one: a fixed target can be out of any schedule's reach."""
    steps, calls_per_step = workload.num_steps, workload.calls_per_step
    space = Space(table.levels, table.step_ms(calls_per_step), steps, 1, math.inf)
    fastest = space.latency(space.cheapest())
    return 1 + share * (table.predict([1.0] * steps, calls_per_step) / fastest - 1)


def test_profile_measures_every_level_for_this_setting(workload, sparse, table):
    assert table.levels == LEVELS
    assert table.key == CostKey.here(sparse, workload)
    assert all(ms > 0 for ms in table.latency_ms)
    # A whole-step skip runs only the embeddings, the head and one cache addition per block:
    # cheaper than any real forward (on this tiny model those parts are a third of one; the
    # margin is for a loaded machine's timings).
    assert table.call_ms(0.0) < min(table.latency_ms[1:])
    # The sampler's work between calls, from the profiling generations' own wall times: with
    # it the table predicts them (unless the calls' medians already exceed them).
    run = table.meta["profiling_generation"]
    assert table.call_overhead_ms >= 0 and len(run["wall_ms"]) == 2
    expected = max(statistics.median(run["wall_ms"]), run["calls_ms"])
    assert table.predict(run["budgets"], workload.calls_per_step) == pytest.approx(expected)


def test_search_writes_a_schedule_that_reproduces_its_fidelity(workload, sparse, table, tmp_path):
    output, plot = tmp_path / "schedule.json", tmp_path / "search.png"
    settings, target = SearchSettings(population=4, offspring=4, generations=2), reachable(table, workload, 0.8)
    result = search(workload, table, Target(speedup=target), calibration=Calibration(seeds=(0,), confirm=2),
                    settings=settings, sparse=sparse, progress=False)
    result.save(output)
    result.plot(plot)
    limit = table.predict([1.0] * 6, workload.calls_per_step) / target
    assert result.chosen.latency_ms <= limit
    assert all(c.latency_ms <= limit and c.budgets[0] == 1.0 for c in result.candidates)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    schedule = Schedule.load(output)
    meta = schedule.meta["search"]
    assert schedule.budgets == result.chosen.budgets
    assert schedule.model == sparse.structure_hash
    assert meta["predicted_speedup"] >= target and meta["seeds"] == [0]
    assert meta["measured_ms"] > 0 and result.prediction.measured_ms == meta["measured_ms"]
    assert meta["measured_speedup"] == pytest.approx(result.dense.measured_ms / result.prediction.measured_ms)

    # A user's compile of the schedule file gives the fidelity the search reported.
    compiled = torch.compile(workload.model, backend=astraea.backend(schedule=str(output)))
    dense = workload.generate(workload.model, 0)
    mine = fidelity([workload.generate(compiled, 0)], [dense])
    assert mine.score == pytest.approx(result.chosen.score, abs=1e-3)


def test_a_table_that_prices_forecasting_gives_a_search_the_reuse_of_each_step(workload, sparse, tmp_path):
    table = profile(workload, levels=(0.0, 0.5, 1.0), steps_per_level=1, repeats=1, sparse=sparse, forecast=True)
    assert table.forecast_ms is not None and len(table.forecast_ms) == 3
    settings = SearchSettings(population=8, offspring=4, generations=1)  # room for both step-caching starts of period 2
    # The target: TaylorSeer's shape at period 2 (one step in two recomputed, its skips forecasting), as priced
    # here; a target from the copying steps alone can leave every forecasting schedule out of reach on a busy CPU.
    taylor = tuple(1.0 if step % 2 == 0 else 0.0 for step in range(workload.num_steps))
    limit = table.predict(taylor, workload.calls_per_step, tuple("forecast" if b == 0.0 else "copy" for b in taylor))
    result = search(workload, table, Target(latency_ms=limit * (1 + 1e-9)),
                    calibration=Calibration(seeds=(0,), confirm=1), settings=settings, sparse=sparse, progress=False)
    chosen = result.chosen
    assert chosen.reuse is not None and len(chosen.reuse) == workload.num_steps
    assert any("forecast" in (c.reuse or ()) for c in result.candidates)  # TaylorSeer's shape among the starts
    assert result.prediction.predicted_ms == pytest.approx(
        table.predict(chosen.budgets, workload.calls_per_step, chosen.reuse))
    result.save(tmp_path / "s.json")
    schedule = Schedule.load(tmp_path / "s.json")
    assert schedule.reuse == chosen.reuse and schedule.meta["search"]["forecast"]
    # A user's compile of the file gives the fidelity the search reported, each step reusing as it says.
    torch._dynamo.reset()
    compiled = torch.compile(workload.model, backend=astraea.backend(schedule=str(tmp_path / "s.json")))
    mine = fidelity([workload.generate(compiled, 0)], [workload.generate(workload.model, 0)])
    assert mine.score == pytest.approx(chosen.score, abs=1e-3)


def test_resuming_at_a_shared_prefix_matches_running_from_scratch(workload, sparse):
    shared = Evaluator(workload, sparse)
    first = (1.0, 0.5, 1.0, 1.0, 0.25, 0.25)
    second = (1.0, 0.5, 1.0, 1.0, 0.75, 0.0)
    shared(first, [0])
    assert shared.steps_shared == 0
    resumed = shared(second, [0])
    assert shared.steps_shared == 2, "the second schedule should resume at step 2"
    scratch = Evaluator(workload, sparse, share_prefixes=False)(second, [0])
    assert resumed.contribution.psnr == pytest.approx(scratch.contribution.psnr, abs=1e-3)
    assert resumed.contribution.rel_l2 == pytest.approx(scratch.contribution.rel_l2, rel=1e-4)


def test_a_saved_table_is_loaded_for_its_own_setting_only(workload, sparse, table, tmp_path):
    path = tmp_path / "costs.json"
    table.save(path)
    assert load_or_profile(path, workload, sparse) == table  # loaded, not measured again
    elsewhere = dataclasses.replace(table, key=dataclasses.replace(table.key, device="another machine"))
    elsewhere.save(path)
    with pytest.raises(CostTableError, match="another machine"):
        load_or_profile(path, workload, sparse)


def test_a_score_on_the_latents_decodes_nothing_and_a_later_one_on_frames_decodes(workload, sparse, monkeypatch):
    """The search may score candidates on the latents and only the confirmed ones on frames:
    a latent score decodes no frames, a frame score of the same schedule generates it again
    with them, and a frame score then serves a latent request without a generation."""
    decoded = []

    def decoder(latent):
        decoded.append(latent)
        return latent[:, :3].float()  # frames of the latent's first channels: enough to compare

    monkeypatch.setattr(workload, "decoder", decoder)
    evaluator = Evaluator(workload, sparse)
    evaluator.reference(0)  # the dense reference is decoded once, whatever is asked of it later
    budgets = (1.0, 0.5, 0.0, 0.5, 0.0, 0.5)
    before = len(decoded)
    latents = evaluator(budgets, [0], decoded=False)
    assert latents.decoded is None and len(decoded) == before and evaluator.generations == 1
    frames = evaluator(budgets, [0])
    assert frames.decoded is not None and len(decoded) == before + 1 and evaluator.generations == 2
    assert frames.contribution == latents.contribution  # the same generation, scored again
    assert evaluator(budgets, [0], decoded=False) == latents and evaluator.generations == 2


def test_searches_for_several_targets_share_one_evaluator(workload, sparse, table):
    """The second search reuses the first's dense references and scores, and reports only its
    own work."""
    evaluator, settings = Evaluator(workload, sparse), SearchSettings(population=3, offspring=2, generations=1)
    run = lambda speedup: search(workload, table, Target(speedup=speedup),  # noqa: E731
                                 calibration=Calibration(seeds=(0,), confirm=1), settings=settings,
                                 sparse=sparse, evaluator=evaluator, measure=False, progress=False)
    first = run(reachable(table, workload, 0.5))
    reference = evaluator.reference(0)
    second = run(reachable(table, workload, 0.9))
    assert evaluator.reference(0) is reference  # the dense reference was not generated again
    # On this tiny space the second search may find every candidate already scored by the first:
    # it then runs nothing and must report nothing, not the first one's work (the sum below).
    assert first.stats["generations_run"] > 0
    assert first.stats["generations_run"] + second.stats["generations_run"] == evaluator.stats()["generations_run"]
    with pytest.raises(SearchError, match="evaluator's own sparse model"):
        search(workload, table, Target(speedup=1.3), sparse=SparseModel(workload), evaluator=evaluator, progress=False)


def test_cli_profile_then_search(workload, table, tmp_path, capsys):
    torch._dynamo.reset()  # the CLI compiles new instances of the same model class
    model = ["--model", "tiny", "--steps", "6", "--frames", "3", "--height", "8", "--width", "8"]
    costs = tmp_path / "costs.json"
    table.save(costs)  # measured in this process: same model, device and threads as the CLI's
    assert main(["search", *model, "--costs", str(costs), "--speedup", f"{reachable(table, workload, 0.5):.3f}", "--seeds", "0,1",
                 "--population", "3", "--offspring", "2", "--generations", "1", "--confirm", "1",
                 "-o", str(tmp_path / "s.json"), "--checkpoint", str(tmp_path / "c.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "schedule: 1 " in out and "end to end: predicted" in out
    assert json.loads((tmp_path / "c.json").read_text())["generation"] == 1
    assert (tmp_path / "s.png").exists()
    assert Schedule.load(tmp_path / "s.json").meta["search"]["seeds"] == [0, 1]
    # Whole steps only: the same table, its dense and skip levels
    assert main(["search", *model, "--costs", str(costs), "--speedup", "1.3", "--seeds", "0", "--levels", "0,1",
                 "--population", "3", "--offspring", "2", "--generations", "1", "--confirm", "1",
                 "-o", str(tmp_path / "w.json"), "--no-progress"]) == 0
    whole = Schedule.load(tmp_path / "w.json")
    assert set(whole.budgets) <= {0.0, 1.0} and whole.meta["search"]["levels"] == [0.0, 1.0]
    assert Schedule.load(tmp_path / "s.json").meta["search"]["levels"] == list(table.levels)
    # No table yet: the search measures one, only at the levels it may take
    fresh = tmp_path / "fresh.json"
    assert main(["search", *model, "--costs", str(fresh), "--speedup", "1.3", "--seeds", "0", "--levels", "0,0.5,1",
                 "--population", "2", "--offspring", "1", "--generations", "0", "--confirm", "1",
                 "-o", str(tmp_path / "f.json"), "--no-progress"]) == 0
    assert CostTable.load(fresh).levels == (0.0, 0.5, 1.0)

    other = tmp_path / "other.json"
    assert main(["profile", *model, "--levels", "0,1", "--steps-per-level", "1", "--repeats", "1",
                 "-o", str(other)]) == 0
    assert CostTable.load(other).levels == (0.0, 1.0)
    with pytest.raises(CostTableError, match="measured for another setting") as error:
        main(["search", *model[:-1], "16", "--costs", str(other), "--speedup", "1.2", "-o", str(tmp_path / "t.json")])
    assert "shapes: {'hidden_states': [1, 4, 3, 8, 8]" in str(error.value)


def test_magnitude_ratios_follow_the_dense_models_output_from_step_to_step(workload):
    """MagCache's calibration on the workload's own dense run: one ratio per step, the first 1,
    each the cond call's mean output magnitude over the previous step's."""
    from astraea.search.search import magnitude_ratios

    magnitudes = []
    handle = workload.model.register_forward_hook(lambda m, a, out: magnitudes.append(out[0].abs().mean().item()))
    try:
        ratios = magnitude_ratios(workload, seed=0)
    finally:
        handle.remove()
    cond = magnitudes[:: workload.calls_per_step]
    assert len(ratios) == workload.num_steps and ratios[0] == 1.0
    assert ratios[1:] == pytest.approx([b / a for a, b in zip(cond, cond[1:])])
    assert not workload.model._forward_hooks  # its own hook is gone
