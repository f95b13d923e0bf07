"""The evolutionary driver on a synthetic fidelity: reproducible, resumable, and it improves."""

import json
import math

import numpy as np
import pytest

from astraea.search.candidates import pareto_front, ranked
from astraea.search.ea import SearchError, Space
from astraea.search.fidelity import Fidelity, FidelityReport
from astraea.search.plot import plot_search
from astraea.search.search import (
    Calibration, SearchSettings, Target, cached_step_genomes, evolve, front_loaded_genomes, initial_population,
    uniform_genomes,
)

LEVELS = tuple(i / 10 for i in range(11))
COSTS = tuple(0.02 + b for b in LEVELS)
SPACE = Space(LEVELS, COSTS, 12, 1, 0.5 * 12 * COSTS[-1])
SETTINGS = SearchSettings(population=8, offspring=8, generations=6, seed=3)


def synthetic(budgets, reuse=None) -> FidelityReport:
    """Early steps matter more than late ones, as in diffusion; a skip costs a little extra, and
    less when it forecasts; a partial step that forecasts loses more (as on reference v2)."""
    modes = reuse or ("copy",) * len(budgets)
    loss = sum(math.exp(-s / 3) * ((1 - b) ** 2 * (1.5 if m == "forecast" else 1.0)
                                   + (0.01 if m == "forecast" else 0.05) * (b == 0.0))
               for s, (b, m) in enumerate(zip(budgets, modes)))
    f = Fidelity(psnr=40.0 - 10 * loss, ssim=1.0 - loss / 10, rel_l2=loss / 10)
    return FidelityReport(latent=f, contribution=f)


class Counting:
    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, budgets, reuse=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        return synthetic(budgets, reuse)


def test_every_candidate_meets_the_target_and_the_search_beats_uniform():
    candidates = evolve(SPACE, synthetic, SETTINGS, progress=False)
    assert all(c.latency_ms <= SPACE.limit_ms for c in candidates)
    assert all(c.budgets[0] == 1.0 for c in candidates)
    best_uniform = max(synthetic(SPACE.budgets(g)).score for g in uniform_genomes(SPACE))
    assert candidates[0].score > best_uniform + 1.0
    # The best spends its budget early, where the synthetic fidelity needs it.
    best = candidates[0].budgets
    assert sum(best[:6]) > sum(best[6:])


def test_initial_population_starts_from_uniform_front_loaded_and_step_caching_schedules():
    front = front_loaded_genomes(SPACE)
    assert front and all(SPACE.valid(g) for g in front)
    for genome in front:  # k dense steps, then one budget below dense for the rest
        budgets = SPACE.budgets(genome)
        k = budgets.index(min(budgets))
        assert set(budgets[:k]) == {1.0} and len(set(budgets[k:])) == 1
    cached = cached_step_genomes(SPACE)
    assert len(cached) == 3 and all(SPACE.valid(g) for g in cached)
    for period, genome in zip((2, 3, 4), cached):  # k dense steps, then a refresh every p-th step
        budgets = SPACE.budgets(genome)
        k = budgets.index(0.0)
        assert set(budgets[:k]) == {1.0} and budgets[k] == 0.0
        refreshed = [s for s in range(k, len(budgets)) if budgets[s] > 0]
        assert refreshed and all((s - k) % period == period - 1 for s in refreshed)
        (level,) = {budgets[s] for s in refreshed}
        # the most dense first steps that fit (with dense refreshes if any fit): one more would not
        n = len(budgets)
        more = [1.0] * (k + 1) + [level if (s - k - 1) % period == period - 1 else 0.0 for s in range(k + 1, n)]
        assert SPACE.latency(SPACE.genome(more)) > SPACE.limit_ms
    population = initial_population(SPACE, 8, np.random.default_rng(0))
    assert len(population) == 8 and all(SPACE.valid(g) for g in population)
    members = {tuple(g) for g in population}
    assert tuple(uniform_genomes(SPACE)[-1]) in members
    assert sum(tuple(g) in members for g in front) >= 2
    assert sum(tuple(g) in members for g in cached) >= 2


def test_same_seed_same_search_and_another_seed_another():
    a = evolve(SPACE, synthetic, SETTINGS, progress=False)
    b = evolve(SPACE, synthetic, SETTINGS, progress=False)
    c = evolve(SPACE, synthetic, SearchSettings(**{**vars(SETTINGS), "seed": 4}), progress=False)
    assert a == b
    assert {x.budgets for x in a} != {x.budgets for x in c}


@pytest.mark.parametrize("fraction", [0.3, 0.55])  # in the initial population, and in a later generation
def test_resume_after_interruption_ends_as_an_uninterrupted_search(tmp_path, fraction):
    whole = Counting()
    expected = evolve(SPACE, whole, SETTINGS, checkpoint=tmp_path / "whole.json", progress=False)

    path = tmp_path / "interrupted.json"
    interrupted = Counting(fail_after=int(whole.calls * fraction))
    with pytest.raises(KeyboardInterrupt):
        evolve(SPACE, interrupted, SETTINGS, checkpoint=path, progress=False)
    saved = json.loads(path.read_text())
    assert len(saved["archive"]) == interrupted.calls  # written after every candidate, mid-generation too
    resumed = Counting()
    assert evolve(SPACE, resumed, SETTINGS, checkpoint=path, progress=False) == expected
    # No candidate scored before the interruption was scored again.
    assert resumed.calls == whole.calls - interrupted.calls


def test_extending_a_finished_search_equals_a_longer_one(tmp_path):
    path = tmp_path / "search.json"
    short = SearchSettings(**{**vars(SETTINGS), "generations": 3})
    evolve(SPACE, synthetic, short, checkpoint=path, progress=False)
    assert evolve(SPACE, synthetic, SETTINGS, checkpoint=path, progress=False) == evolve(
        SPACE, synthetic, SETTINGS, progress=False
    )


def test_checkpoint_of_another_search_is_refused(tmp_path):
    path = tmp_path / "search.json"
    evolve(SPACE, synthetic, SETTINGS, checkpoint=path, problem={"seeds": [0]}, progress=False)
    with pytest.raises(SearchError, match="belongs to another search.*seeds: \\[0\\] vs \\[1\\]"):
        evolve(SPACE, synthetic, SETTINGS, checkpoint=path, problem={"seeds": [1]}, progress=False)
    tighter = Space(LEVELS, COSTS, 12, 1, 0.4 * 12 * COSTS[-1])
    with pytest.raises(SearchError, match="space"):
        evolve(tighter, synthetic, SETTINGS, checkpoint=path, problem={"seeds": [0]}, progress=False)
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 7}))
    with pytest.raises(SearchError, match="version 7"):
        evolve(SPACE, synthetic, SETTINGS, checkpoint=path, problem={"seeds": [0]}, progress=False)


def test_pareto_front_and_plot(tmp_path):
    candidates = evolve(SPACE, synthetic, SETTINGS, progress=False)
    front = pareto_front(candidates)
    for c in front:  # nothing at most as slow scores higher
        assert not any(o.latency_ms <= c.latency_ms and o.score > c.score for o in candidates)
    for c in set(candidates) - set(front):  # something on the front is as fast and as good
        assert any(o.latency_ms <= c.latency_ms and o.score >= c.score for o in front)
    assert [c.score for c in front] == sorted(c.score for c in front)
    path = tmp_path / "search.png"
    plot_search(candidates, ranked(candidates)[0], candidates[-1], 12 * COSTS[-1], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_targets_and_calibrations_refuse_what_cannot_be_searched():
    """A search's target, seeds and settings are checked when they are made, with the reason."""
    for bad, reason in ((dict(), "exactly one target"), (dict(speedup=2.0, latency_ms=3.0), "exactly one target"),
                        (dict(speedup=-1.0), "positive"), (dict(speedup=0.0), "positive")):
        with pytest.raises(SearchError, match=reason):
            Target(**bad)
    with pytest.raises(SearchError, match="proxy_seeds must be between 1 and the 1"):
        Calibration(seeds=(0,), proxy_seeds=2)
    with pytest.raises(SearchError, match="confirm at least one"):
        Calibration(confirm=0)
    with pytest.raises(SearchError, match="full_steps >= 0"):
        SearchSettings(full_steps=-1)
    assert Target(speedup=2.0).limit_ms(10.0) == 5.0 and Target(latency_ms=3.0).limit_ms(10.0) == 3.0
    assert Calibration(seeds=[1, 2, 3], proxy_seeds=2).proxy == (1, 2)


def test_magcache_rule_skips_while_the_accumulated_magnitude_change_stays_small():
    """MagCache's rule by hand: ratios near 1 accumulate little error, so steps are skipped up
    to the run limit; a large ratio forces a computed step, which starts the count afresh."""
    from astraea.search.search import magnitude_skips

    ratios = [1.0, 1.0, 0.99, 0.99, 0.99, 0.99, 0.7, 0.99, 0.99]
    assert magnitude_skips(ratios, 0.1, 2, kept=2) == [False, False, True, True, False, True, False, True, True]
    # error after steps 2, 3, 4: 0.01, 0.01 + 0.0199, 0.0298 + 0.0297: over 0.05 at the third
    assert magnitude_skips(ratios, 0.05, 4, kept=2)[:5] == [False, False, True, True, False]
    assert not any(magnitude_skips(ratios, 0.0, 4, kept=0))


def test_magcache_genomes_fit_the_target_and_join_the_initial_population():
    from astraea.search.search import MAGCACHE_KEPT, MAGCACHE_MAX_SKIPS, magnitude_genomes

    ratios = [1.0] + [0.97] * (SPACE.num_steps - 1)
    genomes = magnitude_genomes(SPACE, ratios)
    assert len(genomes) == len(MAGCACHE_MAX_SKIPS)
    kept = round(MAGCACHE_KEPT * SPACE.num_steps)
    for genome in genomes:
        budgets = SPACE.budgets(genome)
        assert SPACE.latency(genome) <= SPACE.limit_ms and set(budgets) <= {0.0, 1.0}
        assert set(budgets[:kept]) == {1.0} and 0.0 in budgets
    population = initial_population(SPACE, 16, np.random.default_rng(0), ratios)
    assert all(any(np.array_equal(g, m) for g in population) for m in genomes[:2])  # an eighth of 16
    with pytest.raises(SearchError, match="magnitude ratios"):
        magnitude_genomes(SPACE, ratios[:-1])


def test_a_time_limit_stops_between_generations_and_a_rerun_resumes(tmp_path):
    """At its limit the search breeds no further generation and keeps what it scored; run again
    without one, it resumes from the checkpoint and ends where an unlimited search ends."""
    path = tmp_path / "search.json"
    first = Counting()
    stopped = evolve(SPACE, first, SearchSettings(population=8, offspring=8, generations=6, seed=3, minutes=0),
                     checkpoint=path, progress=False)
    assert first.calls <= SETTINGS.population and len(stopped) == first.calls
    assert json.loads(path.read_text())["generation"] == 0
    resumed = evolve(SPACE, Counting(), SETTINGS, checkpoint=path, progress=False)
    assert [c.budgets for c in resumed] == [c.budgets for c in evolve(SPACE, synthetic, SETTINGS, progress=False)]
    with pytest.raises(SearchError, match="minutes must be positive"):
        SearchSettings(minutes=-1)


def _forecasting_space() -> Space:
    """SPACE with each partial level and the skip also offered forecasting, at a little more cost."""
    rows = sorted([(b, "copy", c) for b, c in zip(LEVELS, COSTS)] + [(b, "forecast", c + 0.01) for b, c in
                                                                       zip(LEVELS, COSTS) if b < 1.0])
    levels, modes, costs = zip(*rows)
    return Space(levels, costs, 12, 1, 0.5 * 12 * COSTS[-1], modes)


def test_a_search_that_may_forecast_chooses_the_mode_per_step_and_resumes_with_it(tmp_path):
    space = _forecasting_space()
    population = initial_population(space, 12, np.random.default_rng(0))
    taylor = [g for g in cached_step_genomes(space) if "forecast" in space.modes(g)]
    assert len(taylor) == len(cached_step_genomes(space)) // 2  # each period copying, and forecasting its skips
    for g in taylor:
        assert {m for b, m in zip(space.budgets(g), space.modes(g)) if b == 0.0} == {"forecast"}
    assert any("forecast" in space.modes(g) for g in population)  # TaylorSeer's shape starts the search
    path = tmp_path / "search.json"
    interrupted = Counting(fail_after=30)
    with pytest.raises(KeyboardInterrupt):
        evolve(space, interrupted, SETTINGS, checkpoint=path, progress=False)
    found = evolve(space, Counting(), SETTINGS, checkpoint=path, progress=False)
    assert found == evolve(space, synthetic, SETTINGS, progress=False)
    best = found[0]
    assert best.latency_ms <= space.limit_ms and best.reuse is not None
    assert "forecast" in [m for b, m in zip(best.budgets, best.reuse) if b == 0.0]  # a skip that forecasts
    assert space.budgets(space.genome(best.budgets, best.reuse)) == best.budgets
    with pytest.raises(SearchError, match="not among the choices"):
        space.genome(best.budgets, ("sometimes",) * 12)
