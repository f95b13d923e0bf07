"""The budget search: an evolutionary search of per-step budgets under a latency target.

The paper's search scored every candidate on four decoded videos and held a FLOP proxy to a
target, 82 GPU-hours on average. This one is cheaper in each part:
- latency is predicted from a cost table measured once on the device (no candidate is timed);
- fidelity is scored on a proxy, the first of the calibration seeds, through an evaluator
  that generates each dense reference once, never runs a schedule twice and shares
  trajectory prefixes between candidates; the few best are then confirmed on all seeds,
  beside the best uniform schedule within the target (the chosen one is never worse than it
  there), and the chosen one timed end to end, so the prediction is checked, not trusted;
- the initial population holds the uniform schedules, the "first k steps dense, then
  uniform" ones, the step-caching ones ("first k dense, then every p-th step refreshed, the
  others skipped": TaylorSeer's fixed interval) and MagCache's (skips while the output
  magnitudes of a dense run say little changes) that fit the target, so the search starts
  from the peers' own answers and every generation can only improve on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from astraea.config import AstraeaConfig
from astraea.schedule import Schedule

from .candidates import Candidate, ranked
from .checkpoint import INITIAL, Checkpoint
from .costs import CostKey, CostTable, Prediction
from .ea import SearchError, Space, breed, mutation_rate, random_genome, repair
from .evaluator import Evaluator
from .fidelity import FidelityReport
from .plot import plot_search
from .sparse import SparseModel
from .workload import Workload


# MagCache's starting schedules (its defaults: retention ratio 0.2, K up to 4 skips in a row).
MAGCACHE_KEPT = 0.2  # share of the first steps always computed
MAGCACHE_MAX_SKIPS = (2, 3, 4)
MAGCACHE_THRESHOLDS = tuple(round(0.02 * k, 2) for k in range(1, 51))  # 0.02 to 1.0


@dataclass(frozen=True)
class SearchSettings:
    """How the evolutionary search runs (the paper's early code: population 50, 100
    generations; a measured cost model and a seeded start need far fewer)."""

    population: int = 12
    offspring: int = 12
    generations: int = 8
    crossover: float = 0.9
    mutation: float = 0.3  # per-gene probability in the first generation ...
    mutation_decay: float = 0.8  # ... multiplied by this every generation ...
    mutation_floor: float = 0.03  # ... down to this
    seed: int = 0
    full_steps: int = 1  # the first steps of every candidate run dense
    minutes: float | None = None  # breed no further generation once the search has run this long (in this process)

    def __post_init__(self):
        if self.population < 2 or self.offspring < 1 or self.generations < 0 or self.full_steps < 0:
            raise SearchError(
                f"need population >= 2, offspring >= 1, generations >= 0, full_steps >= 0; got "
                f"{self.population}, {self.offspring}, {self.generations}, {self.full_steps}"
            )
        if self.minutes is not None and self.minutes < 0:
            raise SearchError(f"minutes must be positive or None, got {self.minutes}")


@dataclass(frozen=True)
class Target:
    """What the chosen schedule must reach, as the cost table predicts it: a `speedup` over the
    all-dense schedule or a `latency_ms` for the transformer calls of one generation."""

    speedup: float | None = None
    latency_ms: float | None = None

    def __post_init__(self):
        if (self.speedup is None) == (self.latency_ms is None):
            raise SearchError("give exactly one target: speedup or latency_ms")
        if any(v is not None and v <= 0 for v in (self.speedup, self.latency_ms)):
            raise SearchError(f"a target must be positive, got {self}")

    def limit_ms(self, dense_ms: float) -> float:
        return dense_ms / self.speedup if self.speedup is not None else self.latency_ms


@dataclass(frozen=True)
class Calibration:
    """The seeds fidelity is scored on: every candidate on the first `proxy_seeds`, the
    `confirm` best again on all of them, and the best of those is chosen.

    `decode_proxy`: score every candidate on decoded frames too, where the workload has them;
    by default the candidates are scored on the latents (the model's contribution) and only the
    confirmation decodes: a decode and its comparison cost a fifth of a candidate in `tune` on
    the Wan2.1-1.3B shape, and on reference v2 the two views rank a search's starting schedules
    alike (Spearman 0.94; benchmarks/NOTES.md).
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3)
    proxy_seeds: int = 1
    confirm: int = 3  # each costs a generation per seed beyond the proxy ones: 3 of them hold tune under 15 minutes
    decode_proxy: bool = False

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not 1 <= self.proxy_seeds <= len(self.seeds):
            raise SearchError(f"proxy_seeds must be between 1 and the {len(self.seeds)} calibration seeds, "
                              f"got {self.proxy_seeds}")
        if self.confirm < 1:
            raise SearchError(f"confirm at least one candidate, got {self.confirm}")

    @property
    def proxy(self) -> tuple[int, ...]:
        return self.seeds[: self.proxy_seeds]


def evolve(
    space: Space,
    score: Callable[[tuple[float, ...]], FidelityReport],
    settings: SearchSettings = SearchSettings(),
    *,
    checkpoint: str | os.PathLike | None = None,
    problem: dict | None = None,
    progress: bool = True,
    ratios: Sequence[float] | None = None,
) -> list[Candidate]:
    """Run the (mu + lambda) evolutionary search; returns every evaluated candidate, best first.

    `score(budgets, reuse)` gives a schedule's fidelity (`reuse`: its per-step modes, None in a
    space without them). With `checkpoint`, the state is written after
    every generation and, when the file exists, the search resumes from it (`problem`
    describes what the search is, to refuse a checkpoint of another one). `ratios`: the
    magnitude ratios of a dense run (`magnitude_ratios`), for MagCache-shaped starting schedules.
    With `settings.minutes`, no generation starts once that much time has passed since this
    call began; the ones finished are kept, and a later call resumes from the checkpoint.
    """
    started = time.perf_counter()
    shaping = {k: v for k, v in dataclasses.asdict(settings).items() if k != "minutes"}  # how long: not the problem
    problem = json.loads(json.dumps({"space": dataclasses.asdict(space), **(problem or {}),
                                     "settings": {**shaping, "generations": None}}))
    archive: dict[tuple, Candidate] = {}  # by the candidates' keys
    # One tick per candidate, evaluated or found in the archive: on a GPU one generation of
    # candidates takes minutes, too long to show nothing.
    bar = tqdm(total=settings.population + settings.generations * settings.offspring, desc="search candidates",
               disable=not progress)

    # Where a resumed search starts again: the generations done, their population and the random
    # state before the next one is bred. The checkpoint is written after every candidate, so an
    # interrupted search loses at most the one it was scoring: resumed, it breeds the same
    # children from the same state and finds the ones already scored in the archive.
    rng = np.random.default_rng(settings.seed)
    start = {"done": INITIAL, "population": [], "rng": rng.bit_generator.state}

    def evaluate(genomes: list[np.ndarray]) -> list[Candidate]:
        for g in genomes:
            key = space.key(g)
            if key not in archive:
                budgets, reuse = space.budgets(g), space.modes(g)
                archive[key] = Candidate(budgets, space.latency(g), score(budgets, reuse), reuse)
                _save(checkpoint, problem, start["done"], start["population"], start["rng"], archive)
            bar.update(1)
        return [archive[space.key(g)] for g in genomes]

    def survivors(pool: list[Candidate]) -> list[Candidate]:
        return ranked({c.key: c for c in pool}.values())[: settings.population]

    def finished(done: int, population: list[Candidate]) -> None:
        start.update(done=done, population=population, rng=rng.bit_generator.state)
        _save(checkpoint, problem, done, population, start["rng"], archive)

    population, done = [], INITIAL
    if checkpoint is not None and os.path.exists(checkpoint):
        state = Checkpoint.load(checkpoint, problem)
        rng.bit_generator.state = state.rng
        archive.update((c.key, c) for c in state.archive)
        population, done = [archive[key] for key in state.population], state.generation
        start.update(done=done, population=population, rng=state.rng)
        if done > INITIAL:
            bar.update(settings.population + min(done, settings.generations) * settings.offspring)
    if done == INITIAL:
        population, done = survivors(evaluate(initial_population(space, settings.population, rng, ratios))), 0
        finished(0, population)
    for generation in range(done, settings.generations):
        if settings.minutes is not None and time.perf_counter() - started >= 60 * settings.minutes:
            if progress:
                tqdm.write(f"search: stopped after {generation} of {settings.generations} generations, at its limit "
                           f"of {settings.minutes:g} minutes; run again to resume from the checkpoint")
            break
        rate = mutation_rate(generation, settings.mutation, settings.mutation_decay, settings.mutation_floor)
        parents = [space.genome(c.budgets, c.reuse) for c in population]
        children = breed(space, parents, settings.offspring, rate, settings.crossover, rng)
        population = survivors(population + evaluate(children))
        finished(generation + 1, population)
        bar.set_postfix(generation=generation + 1, best=f"{population[0].score:.2f} dB")
    bar.close()
    return ranked(archive.values())


def _save(path, problem, generation, population, rng_state, archive) -> None:
    if path is not None:
        Checkpoint(problem, generation, tuple(c.key for c in population), rng_state,
                   tuple(archive.values())).save(path)


def _filled(space: Space, level: int, dense_steps: int = 0) -> np.ndarray:
    """The first `dense_steps` steps dense, every other step as close to `level` as it may be."""
    return space.snap([space.dense] * dense_steps + [level] * (space.num_steps - dense_steps))


def uniform_genomes(space: Space) -> list[np.ndarray]:
    """Every schedule that uses one budget for all free steps and fits the target."""
    genomes = (_filled(space, level) for level in range(len(space.levels)))
    return [g for g in genomes if space.latency(g) <= space.limit_ms]


def front_loaded_genomes(space: Space) -> list[np.ndarray]:
    """For each k, the first k steps dense and the most compute that fits on the others, one
    budget for all: the hand-made schedule diffusion users reach for first."""
    genomes = []
    for k in range(1, space.num_steps):
        fits = [g for g in (_filled(space, level, k) for level in range(len(space.levels))) if space.latency(g) <= space.limit_ms]
        if fits:
            genomes.append(fits[-1])
    return genomes


def _periodic(space: Space, dense_steps: int, period: int, level: int, skip: int = 0) -> np.ndarray:
    """The first `dense_steps` steps dense, then every `period`-th step at `level` and the
    steps between skipped (as the choice `skip` skips)."""
    return space.snap([space.dense if s < dense_steps else level if (s - dense_steps) % period == period - 1 else skip
                       for s in range(space.num_steps)])


def cached_step_genomes(space: Space, periods: Sequence[int] = (2, 3, 4)) -> list[np.ndarray]:
    """For each period p, the step caching of TeaCache and MagCache: the first k steps dense,
    then every p-th step refreshed and the others skipped, with the most dense first steps that
    fit (and the refresh lowered when none fits). On smooth trajectories these beat any
    uniform budget by far (benchmarks/NOTES.md), and a random start rarely finds them. In a
    space that forecasts, each comes twice: its skips copying, and forecasting (TaylorSeer's
    fixed interval)."""
    skips = [space.skip()] + ([space.skip("forecast")] if space.reuse and "forecast" in space.reuse else [])
    genomes = []
    for period in periods:
        for skip in skips:
            refreshes = (i for i in range(space.dense, 0, -1)  # refreshed steps copy: partial ones forecast worse
                         if space.levels[i] > 0 and (space.reuse is None or space.reuse[i] == "copy"))
            for level in refreshes:
                fits = [g for g in (_periodic(space, k, period, level, skip) for k in range(1, space.num_steps))
                        if space.latency(g) <= space.limit_ms]
                if fits:
                    genomes.append(fits[-1])
                    break
    return genomes


def magnitude_ratios(workload, seed: int) -> tuple[float, ...]:
    """MagCache's calibration, on a dense generation of `seed`: per step, the mean magnitude of
    the transformer's output at the step's first call (cond) over the previous step's, 1 for
    the first step. (MagCache measures the residual its blocks add; the output is that residual
    through the model's head.)"""
    magnitudes = []

    def note(module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        magnitudes.append(out.detach().float().abs().mean().item())

    handle = workload.model.register_forward_hook(note)
    try:
        workload.generate(workload.model, seed)
    finally:
        handle.remove()
    first = magnitudes[:: workload.calls_per_step]
    return (1.0, *(b / a if a > 0 else 1.0 for a, b in zip(first, first[1:])))


def magnitude_skips(ratios: Sequence[float], threshold: float, max_skips: int, kept: int) -> list[bool]:
    """MagCache's rule: after the first `kept` steps, skip a step while the error its skips
    have accumulated (the sum over them of |1 - the product of their ratios so far|) stays
    under `threshold` and at most `max_skips` steps have been skipped in a row; a computed
    step starts the count afresh."""
    skips, ratio, error, run = [], 1.0, 0.0, 0
    for step, r in enumerate(ratios):
        if step < kept:
            skips.append(False)
            continue
        ratio, run = ratio * r, run + 1
        error += abs(1.0 - ratio)
        if error < threshold and run <= max_skips:
            skips.append(True)
        else:
            skips.append(False)
            ratio, error, run = 1.0, 0.0, 0
    return skips


def magnitude_genomes(space: Space, ratios: Sequence[float]) -> list[np.ndarray]:
    """For each run length MagCache allows (MAGCACHE_MAX_SKIPS), its schedule at the lowest
    threshold that fits: the first MAGCACHE_KEPT of the steps dense, then its rule's skips,
    the other steps dense."""
    if len(ratios) != space.num_steps:
        raise SearchError(f"{len(ratios)} magnitude ratios for {space.num_steps} steps")
    kept = max(space.full_steps, round(MAGCACHE_KEPT * space.num_steps))
    genomes = []
    for max_skips in MAGCACHE_MAX_SKIPS:
        for threshold in MAGCACHE_THRESHOLDS:
            skips = magnitude_skips(ratios, threshold, max_skips, kept)
            genome = space.snap([0 if skip else space.dense for skip in skips])
            if space.latency(genome) <= space.limit_ms:
                genomes.append(genome)
                break
    return genomes


def initial_population(space: Space, size: int, rng: np.random.Generator,
                       ratios: Sequence[float] | None = None) -> list[np.ndarray]:
    """Up to a quarter each of uniform schedules that fit (most compute first), front-loaded ones
    (spread over how many steps run dense), step-caching ones (one per period) and, given a
    dense run's magnitude `ratios`, up to an eighth of MagCache's, the dense schedule lowered
    at random steps until it fits, and random schedules for the rest. Elitism keeps the best of
    them, so the search ends at least as good as these on its calibration seeds."""
    share = max(1, size // 4)
    genomes = uniform_genomes(space)[::-1][:share]
    front = front_loaded_genomes(space)
    if front:
        picks = np.unique(np.linspace(0, len(front) - 1, min(len(front), share)).round().astype(int))
        genomes += [front[i] for i in picks]
    genomes += cached_step_genomes(space)[:share]
    if ratios is not None:  # fewer: each is a step-caching schedule too, and random ones keep their place
        genomes += magnitude_genomes(space, ratios)[: max(1, size // 8)]
    genomes.append(repair(space, np.full(space.num_steps, space.dense), rng))
    genomes += [random_genome(space, rng) for _ in range(size - len(genomes))]
    return genomes[:size]


@dataclass(frozen=True)
class SearchResult:
    schedule: Schedule
    chosen: Candidate  # scored on every calibration seed
    candidates: list[Candidate]  # every candidate the search evaluated, on the proxy seeds, best first
    uniform: Candidate | None  # the best uniform schedule within the target, on every seed
    prediction: Prediction | None  # predicted vs measured latency of the chosen schedule ...
    dense: Prediction | None  # ... and of the all-dense one
    wall_s: float
    stats: dict

    def save(self, path: str | os.PathLike) -> None:
        """The schedule file, for `torch.compile(..., options={"schedule": path})`."""
        self.schedule.save(path)

    def plot(self, path: str | os.PathLike) -> None:
        """Every candidate's predicted latency against its fidelity, the chosen and the uniform one."""
        dense_ms = self.schedule.meta["search"]["dense_predicted_ms"]
        plot_search(self.candidates, self.chosen, self.uniform, dense_ms, path)


def search(
    workload: Workload,
    table: CostTable,
    target: Target,
    *,
    calibration: Calibration = Calibration(),
    settings: SearchSettings = SearchSettings(),
    sparse: SparseModel | None = None,
    evaluator: Evaluator | None = None,
    measure: bool = True,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
) -> SearchResult:
    """Search per-step budgets for `workload` that meet `target`, as `table` predicts latency.

    Phases: the evolutionary search on the calibration's proxy seeds (`evolve`, resumable
    from `checkpoint`); the best candidates confirmed on every seed, beside the best uniform
    schedule within the target, and the best of them chosen; the chosen schedule and the dense one timed end to
    end (`measure`), so the prediction is checked, not trusted.

    `sparse` is the workload compiled for a token selection (`SparseModel(workload, config)`;
    default: astraea's defaults); dynamo keeps at most 8 compilations of one forward per
    process, so pass the one `profile` used. `evaluator` (on `sparse`) carries dense
    references and scores from one search to the next (searches for several targets), and
    sets whether candidates share trajectory prefixes.
    """
    started = time.perf_counter()
    if evaluator is not None and sparse is not None and sparse is not evaluator.sparse:
        raise SearchError("pass the evaluator's own sparse model with it")
    sparse = sparse or (evaluator.sparse if evaluator is not None else SparseModel(workload))
    table.check(CostKey.here(sparse, workload))
    steps, calls_per_step = workload.num_steps, workload.calls_per_step
    dense_ms = table.predict([1.0] * steps, calls_per_step)
    limit = target.limit_ms(dense_ms)
    levels, modes, costs, kept = table.choices(calls_per_step)  # with forecasting priced, each partial level twice
    space = Space(levels, costs, steps, settings.full_steps, limit, modes, kept)
    evaluator = evaluator or Evaluator(workload, sparse)
    work_before = evaluator.stats()
    proxy, seeds = calibration.proxy, calibration.seeds

    candidates = evolve(
        space, lambda budgets, reuse: evaluator(budgets, proxy, reuse, decoded=calibration.decode_proxy), settings,
        checkpoint=checkpoint, progress=progress,
        problem={"seeds": list(proxy), "options": sparse.options,
                 **({"scored_on": "latents"} if workload.decodes and not calibration.decode_proxy else {})},
        ratios=magnitude_ratios(workload, proxy[0]),
    )
    uniform = _best_uniform(space, evaluator, seeds)
    # The best uniform schedule competes too: the proxy seeds' favourites can lose to it on all seeds.
    chosen = ranked(
        [dataclasses.replace(c, fidelity=evaluator(c.budgets, seeds, c.reuse))
         for c in candidates[: calibration.confirm]]
        + ([uniform] if uniform is not None else [])
    )[0]
    prediction = dense = None
    if measure:
        prediction, dense = (_measure(workload, sparse, table, *schedule)
                             for schedule in ((chosen.budgets, chosen.reuse), ((1.0,) * steps, None)))
    wall_s = time.perf_counter() - started
    stats = {"evaluated": len(candidates), **evaluator.stats(since=work_before)}
    schedule = Schedule(
        budgets=chosen.budgets,
        reuse=chosen.reuse,
        times=workload.step_times(),
        model=sparse.structure_hash,
        meta={
            "search": {
                "target": {"speedup": target.speedup, "latency_ms": target.latency_ms, "limit_ms": limit},
                "predicted_ms": chosen.latency_ms,
                "dense_predicted_ms": dense_ms,
                "predicted_speedup": dense_ms / chosen.latency_ms,
                "measured_ms": prediction.measured_ms if prediction else None,
                "dense_measured_ms": dense.measured_ms if dense else None,
                "measured_speedup": dense.measured_ms / prediction.measured_ms if prediction else None,
                "prediction_error": prediction.error if prediction else None,
                "fidelity": chosen.fidelity.to_json(),
                "uniform": uniform.to_json() if uniform else None,
                "seeds": list(seeds),
                "proxy_seeds": list(proxy),
                "proxy_decoded": calibration.decode_proxy and workload.decodes,  # else scored on the latents
                "num_steps": steps,
                "levels": list(table.levels),  # the budgets a step could take ([0, 1]: whole steps only)
                "forecast": modes is not None,  # whether a step could forecast
                "guidance": workload.guidance,  # the sampler the fidelity was scored on
                "options": sparse.options,
                "cost_table": table.key.to_json(),
                "settings": dataclasses.asdict(settings),
                "wall_s": wall_s,
                **stats,
            }
        },
    )
    return SearchResult(schedule, chosen, candidates, uniform, prediction, dense, wall_s, stats)


def _best_uniform(space: Space, evaluator: Evaluator, seeds: tuple[int, ...]) -> Candidate | None:
    """The uniform schedule with the largest budget within the target (copying, as the backend
    does by default), on every seed."""
    best = [g for g in uniform_genomes(space) if "forecast" not in (space.modes(g) or ())][-1:]
    if not best:
        return None
    budgets, reuse = space.budgets(best[0]), space.modes(best[0])
    return Candidate(budgets, space.latency(best[0]), evaluator(budgets, seeds, reuse), reuse)


def _measure(workload: Workload, sparse: SparseModel, table: CostTable, budgets: tuple[float, ...],
             reuse: tuple[str, ...] | None) -> Prediction:
    """A whole generation with `budgets`, timed end to end, next to its prediction: the median of
    three, with no untimed run first, since scoring the candidates ran every budget level and
    captured its call graphs (the median would drop a first run that captured one anyway)."""
    sparse.set_schedule(budgets, workload.step_times(), reuse)
    measured = statistics.median(workload.time_generation(sparse.module, 0) for _ in range(3))
    return table.prediction(budgets, measured, workload.calls_per_step, reuse)
