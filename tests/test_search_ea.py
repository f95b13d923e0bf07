"""The genetic operators keep every constraint, whatever the costs, target and parents."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astraea.search.ea import (
    SearchError, Space, breed, crossover, mutate, mutation_rate, random_genome, repair,
)

LEVELS = tuple(i / 10 for i in range(11))


@st.composite
def spaces(draw):
    """Spaces with noisy, not always monotonic, costs and any feasible target."""
    num_steps = draw(st.integers(1, 24))
    full_steps = draw(st.integers(0, num_steps))
    dense = draw(st.floats(1.0, 100.0))
    noise = draw(st.lists(st.floats(-0.15, 0.15), min_size=len(LEVELS), max_size=len(LEVELS)))
    costs = tuple(max(0.0, dense * (0.02 + b + n)) for b, n in zip(LEVELS, noise))
    unconstrained = Space(LEVELS, costs, num_steps, full_steps, float("inf"))
    fastest = unconstrained.latency(unconstrained.cheapest())
    slack = draw(st.floats(0.0, 1.0))
    limit = fastest + slack * max(0.0, costs[-1] * num_steps - fastest)
    return Space(LEVELS, costs, num_steps, full_steps, limit)


def genomes(space):
    return st.lists(st.integers(0, len(LEVELS) - 1), min_size=space.num_steps, max_size=space.num_steps).map(np.array)


def assert_valid(space, genome):
    assert genome.shape == (space.num_steps,)
    assert space.latency(genome) <= space.limit_ms
    assert all(0 <= g < len(LEVELS) for g in genome)
    assert all(genome[: space.full_steps] == space.dense)
    assert genome[0] != 0, "the first step can never be a skip"
    assert space.valid(genome)


@settings(max_examples=150, deadline=None)
@given(st.data(), spaces())
def test_repair_keeps_every_constraint(data, space):
    genome = data.draw(genomes(space))
    fixed = repair(space, genome, np.random.default_rng(data.draw(st.integers(0, 2**32))))
    assert_valid(space, fixed)
    # Repair only lowers costs: a gene that was allowed is never raised.
    costs = np.asarray(space.costs)
    for step, (before, after) in enumerate(zip(genome, fixed)):
        if before in space.allowed(step):
            assert costs[after] <= costs[before]


@settings(max_examples=100, deadline=None)
@given(st.data(), spaces())
def test_repair_leaves_valid_genomes_alone(data, space):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    genome = random_genome(space, rng)
    assert np.array_equal(repair(space, genome, rng), genome)


@settings(max_examples=80, deadline=None)
@given(st.data(), spaces(), st.floats(0.0, 1.0))
def test_breeding_yields_valid_children(data, space, rate):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    population = [random_genome(space, rng) for _ in range(data.draw(st.integers(2, 6)))]
    for child in breed(space, population, 8, rate, 0.9, rng):
        assert_valid(space, child)


def test_crossover_takes_each_gene_from_a_parent():
    rng = np.random.default_rng(0)
    a, b = np.zeros(12, int), np.ones(12, int)
    children = [crossover(a, b, rng) for _ in range(50)]
    assert all(set(c) <= {0, 1} for c in children)
    mixed = [c for c in children if 0 < c.sum() < 12]
    assert mixed, "crossover never mixed the parents"
    two_point = [c for c in mixed if np.count_nonzero(np.diff(c)) <= 2]
    assert two_point, "no child looks like a two-point crossover"


def test_mutation_respects_fixed_genes_and_rate():
    space = Space(LEVELS, LEVELS, 40, 3, 40.0)
    rng = np.random.default_rng(1)
    genome = np.full(40, 5)
    genome[:3] = space.dense
    assert np.array_equal(mutate(space, genome, 0.0, rng), genome)
    mutated = mutate(space, genome, 1.0, rng)
    assert all(mutated[:3] == space.dense)
    assert (mutated[3:] != 5).sum() > 20


def test_mutation_decays_to_its_floor():
    rates = [mutation_rate(g, 0.3, 0.8, 0.03) for g in range(30)]
    assert rates[0] == 0.3 and rates[-1] == 0.03
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_same_seed_same_genomes():
    space = Space(LEVELS, tuple(0.05 + b for b in LEVELS), 16, 1, 6.0)
    runs = [[random_genome(space, np.random.default_rng(7)) for _ in range(3)] for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*runs))


def test_impossible_target_is_refused():
    costs = tuple(0.1 + b for b in LEVELS)
    with pytest.raises(SearchError, match="below the fastest schedule"):
        Space(LEVELS, costs, 10, 2, 1.0)


def test_levels_must_span_skip_to_dense():
    with pytest.raises(SearchError, match="from 0 to 1"):
        Space((0.1, 0.5, 1.0), (1, 2, 3), 4, 1, 100.0)
    with pytest.raises(SearchError, match="costs"):
        Space((0.0, 1.0), (1.0,), 4, 1, 100.0)


def test_budgets_and_genomes_convert_both_ways():
    space = Space(LEVELS, LEVELS, 4, 1, 10.0)
    budgets = (1.0, 0.3, 0.0, 0.7)
    assert space.budgets(space.genome(budgets)) == budgets
    with pytest.raises(SearchError, match="not among the levels"):
        space.genome((1.0, 0.35, 0.0, 0.7))


def _forecasting_space(limit: float, steps: int = 6) -> Space:
    """Levels 0, 0.5, 1; the partial ones also forecasting. Copying costs 1 more per step once any
    step forecasts (the slopes kept), a forecasting choice 1.5 more than its copying twin."""
    levels, modes = (0.0, 0.0, 0.5, 0.5, 1.0), ("copy", "forecast", "copy", "forecast", "copy")
    costs = (0.5, 2.0, 5.0, 6.5, 10.0)
    kept = (1.5, 2.0, 6.0, 6.5, 11.0)
    return Space(levels, costs, steps, 1, limit, modes, kept)


def test_a_schedule_that_forecasts_anywhere_pays_the_kept_slopes_at_every_step():
    space = _forecasting_space(limit=float("inf"))
    copying = space.genome((1.0, 0.5, 0.0, 0.5, 0.0, 0.0))
    assert space.latency(copying) == pytest.approx(10 + 5 + 0.5 + 5 + 0.5 + 0.5)
    one = space.genome((1.0, 0.5, 0.0, 0.5, 0.0, 0.0), ("copy", "copy", "forecast", "copy", "copy", "copy"))
    assert space.latency(one) == pytest.approx(11 + 6 + 2.0 + 6 + 1.5 + 1.5)
    # A dense step's mode forecasts nothing.
    assert space.latency(space.genome((1.0,) * 6, ("forecast",) * 6)) == pytest.approx(60.0)
    with pytest.raises(SearchError, match="reuse modes"):
        Space(LEVELS, LEVELS, 4, 1, 10.0, kept=LEVELS)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.floats(13.0, 60.0))
def test_repair_prices_a_forecasting_genome_as_a_whole(data, limit):
    space = _forecasting_space(limit)
    genome = np.array(data.draw(st.lists(st.integers(0, 4), min_size=6, max_size=6)))
    fixed = repair(space, genome, np.random.default_rng(data.draw(st.integers(0, 2**32))))
    assert space.valid(fixed) and space.latency(fixed) <= limit
