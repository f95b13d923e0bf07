"""Genetic operators over per-step budget schedules, and the constraints they keep.

A genome holds one index per denoising step into the discrete choices of the cost table (its
budget levels; where forecasting is priced, each level below 1 twice, copying and forecasting),
so genes compare exactly and a genome's bytes are a memo key. Every operator that
makes a genome returns one that keeps the constraints: the first `full_steps` genes are the
dense level, the first step is never a skip (there is no previous output to reuse), and the
predicted latency is within the limit. Repair only ever lowers genes, one cost step at a
time, so it ends and it changes as little of a good parent as it can.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..schedule import forecasting_steps


class SearchError(ValueError):
    """A search that cannot run as asked: impossible target, bad levels, bad checkpoint."""


@dataclass(frozen=True)
class Space:
    """The genomes a search may visit.

    levels: the budget of each choice a step may take, ascending, with 0 (skip) and 1 (dense)
        among them; 1 once, as the last choice.
    costs: predicted milliseconds of one whole step (every call of it) at each choice.
    limit_ms: the latency target every genome must meet.
    reuse: each choice's reuse mode ("copy" or "forecast"), where a level may appear once per
        mode; None: one choice per level, each step reusing as the backend's option says.
    kept: with `reuse`, each choice's cost in a schedule that forecasts at some step, which keeps
        the forecasts' slopes on every call it computes (a forecasting choice's own cost); None:
        as `costs`. A genome's latency is the sum of one or the other, so it is not a plain sum
        over steps: a genome that stops forecasting sheds the slopes' cost at every step.
    """

    levels: tuple[float, ...]
    costs: tuple[float, ...]
    num_steps: int
    full_steps: int
    limit_ms: float
    reuse: tuple[str, ...] | None = None
    kept: tuple[float, ...] | None = None

    def __post_init__(self):
        levels = tuple(float(x) for x in self.levels)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
        if self.reuse is None:
            if list(levels) != sorted(set(levels)) or levels[0] != 0.0 or levels[-1] != 1.0:
                raise SearchError(f"budget levels must be ascending, distinct, from 0 to 1, got {levels}")
        else:
            object.__setattr__(self, "reuse", tuple(self.reuse))
            choices = list(zip(levels, self.reuse))
            if (len(choices) != len(levels) or choices != sorted(set(choices)) or levels[0] != 0.0
                    or levels[-1] != 1.0 or levels.count(1.0) != 1):
                raise SearchError(f"choices must be distinct (level, reuse) pairs in order, from 0 to a single 1, "
                                  f"got {levels} with {self.reuse}")
        if len(self.costs) != len(levels):
            raise SearchError(f"{len(levels)} budget levels but {len(self.costs)} costs")
        if self.kept is not None:
            object.__setattr__(self, "kept", tuple(float(c) for c in self.kept))
            if self.reuse is None or len(self.kept) != len(levels):
                raise SearchError("the costs of a forecasting schedule's choices need reuse modes, one per choice")
        if self.num_steps < 1 or not 0 <= self.full_steps <= self.num_steps:
            raise SearchError(
                f"need 1 <= num_steps and 0 <= full_steps <= num_steps, got {self.num_steps}, {self.full_steps}"
            )
        fastest = self.latency(self.cheapest())
        if fastest > self.limit_ms:
            raise SearchError(
                f"target {self.limit_ms:.3f} ms is below the fastest schedule this space allows "
                f"({fastest:.3f} ms with {self.full_steps} full step(s) and a non-skip first step)"
            )

    @property
    def dense(self) -> int:
        return len(self.levels) - 1

    @cached_property
    def _allowed(self) -> tuple[np.ndarray, ...]:
        every = np.arange(len(self.levels))
        computed = every[np.asarray(self.levels) > 0]  # the first step has nothing to reuse
        return tuple(
            np.array([self.dense]) if step < self.full_steps else computed if step == 0 else every
            for step in range(self.num_steps)
        )

    def skip(self, reuse: str = "copy") -> int:
        """The choice of a skipped step that reuses as `reuse` says (the only skip without modes)."""
        return 0 if self.reuse is None else list(zip(self.levels, self.reuse)).index((0.0, reuse))

    def allowed(self, step: int) -> np.ndarray:
        """Level indices step `step` may take."""
        return self._allowed[step]

    def cheapest(self) -> np.ndarray:
        costs = np.asarray(self.costs)
        return np.array([a[np.argmin(costs[a])] for a in self._allowed])

    @cached_property
    def _forecasting(self) -> np.ndarray:
        """Which choices forecast (a dense step forecasts nothing)."""
        return np.array(forecasting_steps(self.levels, self.reuse or ("copy",) * len(self.levels)))

    def latency(self, genome: np.ndarray) -> float:
        forecasts = self.kept is not None and self._forecasting[genome].any()
        return float(np.asarray(self.kept if forecasts else self.costs)[genome].sum())

    def budgets(self, genome: np.ndarray) -> tuple[float, ...]:
        return tuple(self.levels[i] for i in genome)

    def modes(self, genome: np.ndarray) -> tuple[str, ...] | None:
        """Each step's reuse mode, in a space that has them."""
        return None if self.reuse is None else tuple(self.reuse[i] for i in genome)

    def key(self, genome: np.ndarray) -> tuple:
        """The schedule's key, as its candidate's (`Candidate.key`)."""
        return self.budgets(genome), self.modes(genome) or ()

    def genome(self, budgets, reuse=None) -> np.ndarray:
        """Choice indices of a schedule (each step copying where `reuse` is None); a SearchError
        for a step that is not among the choices."""
        if len(budgets) != self.num_steps:
            raise SearchError(f"schedule has {len(budgets)} steps, the search has {self.num_steps}")
        if self.reuse is None:
            if reuse is not None:
                raise SearchError("this search space has no reuse modes")
            index = {b: i for i, b in enumerate(self.levels)}
            wanted = [float(b) for b in budgets]
        else:
            index = {c: i for i, c in enumerate(zip(self.levels, self.reuse))}
            index[1.0, "forecast"] = self.dense  # a dense step reuses nothing
            wanted = list(zip(map(float, budgets), reuse or ("copy",) * len(budgets)))
        missing = sorted({w for w in wanted if w not in index}, key=str)
        if missing:
            raise SearchError(f"budgets {missing} are not among the levels {self.levels}" if self.reuse is None else
                              f"steps {missing} are not among the choices {list(zip(self.levels, self.reuse))}")
        return np.array([index[w] for w in wanted])

    def snap(self, wanted) -> np.ndarray:
        """The genome nearest to `wanted` (a level index per step) that each step allows."""
        return np.array([allowed[np.abs(allowed - w).argmin()] for w, allowed in zip(wanted, self._allowed)])

    def valid(self, genome: np.ndarray) -> bool:
        return all(g in self.allowed(s) for s, g in enumerate(genome)) and self.latency(genome) <= self.limit_ms


def repair(space: Space, genome: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The genome moved into the allowed set, then lowered gene by gene until within the limit."""
    genome = space.snap(genome)
    costs = np.asarray(space.costs)
    floor = costs[space.cheapest()]
    spent = costs[genome]
    while space.latency(genome) > space.limit_ms:
        if not (spent > floor).any():  # cheapest by each step's own cost; its latency is within the limit
            return space.cheapest()
        # Lower a random step that has a strictly cheaper level to its next cheaper one;
        # measured costs need not be monotonic in the budget, so go by cost, not by level.
        step = rng.choice(np.flatnonzero(spent > floor))
        allowed = space.allowed(step)
        cheaper = allowed[costs[allowed] < spent[step]]
        genome[step] = cheaper[costs[cheaper].argmax()]
        spent[step] = costs[genome[step]]
    return genome


def random_genome(space: Space, rng: np.random.Generator) -> np.ndarray:
    genes = np.array([rng.choice(space.allowed(s)) for s in range(space.num_steps)])
    return repair(space, genes, rng)


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Uniform or two-point crossover, half the time each: uniform mixes steps freely,
    two-point keeps runs of neighbouring steps (a skip pattern, a dense stretch) together."""
    if rng.random() < 0.5:
        return np.where(rng.random(len(a)) < 0.5, a, b)
    i, j = sorted(rng.choice(len(a) + 1, size=2, replace=False))
    child = a.copy()
    child[i:j] = b[i:j]
    return child


def mutate(space: Space, genome: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each gene, with probability `rate`, reset to a random allowed level."""
    genome = genome.copy()
    for step in np.flatnonzero(rng.random(space.num_steps) < rate):
        genome[step] = rng.choice(space.allowed(step))
    return genome


def mutation_rate(generation: int, start: float, decay: float, floor: float) -> float:
    """Explore early, refine late. Depends only on the generation, so a resumed or extended
    search mutates exactly as an uninterrupted one would."""
    return max(floor, start * decay**generation)


def parents(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into a population ranked best first, drawn with weight size - rank."""
    weights = np.arange(size, 0, -1, dtype=float)
    return rng.choice(size, size=count, p=weights / weights.sum())


def breed(
    space: Space, ranked: list[np.ndarray], count: int, rate: float, crossover_rate: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """`count` children of a population ranked best first, each repaired into the space."""
    children = []
    for _ in range(count):
        i, j = parents(2, len(ranked), rng)
        child = crossover(ranked[i], ranked[j], rng) if rng.random() < crossover_rate else ranked[i].copy()
        children.append(repair(space, mutate(space, child, rate, rng), rng))
    return children
