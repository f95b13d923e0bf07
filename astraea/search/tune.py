"""`astraea.tune(pipe, prompts, speedup=2)`: a schedule searched on the user's own pipeline.

For each transformer of the pipeline (Wan 2.2 A14B has two, each running a part of the steps):
compile it with astraea, measure its cost table on this device, search budgets by running the
pipeline's own `__call__` (`PipelineWorkload`), and score the chosen schedule and the best
uniform one against the pipeline's dense output on held-out seeds, which the search never saw.
The schedules are on the sampler's time axis (they serve other step counts) and go to one file,
with a plot per transformer; the cost tables and the searches' checkpoints are kept beside it,
so an interrupted `tune` resumes where it stopped (delete them to start afresh).

The pipeline is left as it was found: its transformers are restored, uncompiled if they were.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

from ..config import AstraeaConfig
from ..schedule import Schedule, save_schedules
from .costs import DEFAULT_LEVELS, CostKey, CostTable, CostTableError, profile
from .ea import SearchError
from .evaluator import Evaluator
from .fidelity import FidelityReport
from .pipeline import PipelineWorkload, eager, swapped, transformer_names
from .search import Calibration, SearchResult, SearchSettings, Target, search
from .sparse import SparseModel


@dataclass(frozen=True)
class HeldOut:
    """The chosen and the best uniform schedule scored on seeds the search did not see."""

    seeds: tuple[int, ...]
    chosen: FidelityReport
    uniform: FidelityReport | None

    def to_json(self) -> dict:
        return {"seeds": list(self.seeds), "chosen": self.chosen.to_json(),
                "uniform": None if self.uniform is None else self.uniform.to_json()}


@dataclass(frozen=True)
class TuneResult:
    schedules: dict[str, Schedule]  # per transformer slot
    searches: dict[str, SearchResult]
    held_out: dict[str, HeldOut]
    path: str  # the schedule file

    @property
    def schedule(self) -> Schedule:
        """The schedule of a pipeline with one transformer."""
        if len(self.schedules) != 1:
            raise SearchError(f"the pipeline has {len(self.schedules)} transformers: read result.schedules[name]")
        return next(iter(self.schedules.values()))


def tune(
    pipe,
    prompts: Sequence[str | dict],
    *,
    speedup: float | None = None,
    latency_ms: float | None = None,
    num_inference_steps: int | None = None,
    output: str | os.PathLike = "schedule.json",
    seeds: int = 4,
    held_out: int = 2,
    settings: SearchSettings = SearchSettings(),
    levels: Sequence[float] = DEFAULT_LEVELS,
    forecast: bool = False,
    config: AstraeaConfig | None = None,
    decode: bool = True,
    decode_candidates: bool = False,
    progress: bool = True,
    **pipe_kwargs,
) -> TuneResult:
    """Search a schedule for `pipe` that meets `speedup` over its dense transformer time, or
    `latency_ms` of transformer time per generation (split between two transformers as their
    dense times are), at the best fidelity on its own generations.

    prompts: strings, or dicts of pipeline arguments per prompt (prompt embeddings, negative
        prompts); seed s generates prompts[s % len(prompts)] from its own noise.
    num_inference_steps: the step count searched at (default: the pipeline's own default).
    seeds: calibration seeds 0..seeds-1 for the search; held_out: the seeds after them, for
        the report only.
    levels: the budgets a step may take (profiled, then searched over); fewer levels profile
        faster and leave the search fewer near-equal choices.
    forecast: also price steps that forecast the tokens they do not recompute, and let the
        search choose copy or forecast per step (`Schedule.reuse`).
    decode: score fidelity on the decoded video too (else on the latents only).
    decode_candidates: decode every candidate the search scores on its proxy seed; by default
        the candidates are scored on the latents and only the best few (confirmed on every
        calibration seed) and the held-out seeds on the decoded video, which spares a decode
        per candidate (a fifth of a candidate's time on the Wan2.1-1.3B shape at 33 frames).
    pipe_kwargs: passed to every pipeline call (height, width, num_frames, guidance_scale, ...).
    """
    target = Target(speedup=speedup, latency_ms=latency_ms)
    if seeds < 1 or held_out < 0:
        raise SearchError(f"need at least one calibration seed and no negative held-out count, got {seeds}, {held_out}")
    names = transformer_names(pipe)
    if not names:
        raise SearchError(f"{type(pipe).__name__} has no transformer component to tune")
    steps = num_inference_steps or _default_steps(pipe)
    output = os.fspath(output)
    stem = os.path.splitext(output)[0]
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)  # before an hour of work, not after
    say = (lambda line: tqdm.write(line, file=sys.stderr)) if progress else (lambda line: None)
    # References and probes run the transformers uncompiled; the pipeline gets its own back.
    with swapped(pipe, {name: eager(getattr(pipe, name)) for name in names}):
        workloads, sparse, tables = {}, {}, {}
        for name in names:
            say(f"tune: probing {name} in {type(pipe).__name__} at {steps} steps")
            workloads[name] = PipelineWorkload(pipe, name, prompts, num_inference_steps=steps, decode=decode,
                                               call_kwargs=pipe_kwargs)
            say(f"tune: compiling {name} with astraea")
            sparse[name] = SparseModel(workloads[name], config)
            tables[name] = _cost_table(workloads[name], sparse[name], levels, forecast, f"{stem}.{name}.costs.json",
                                       say)
        dense = {n: tables[n].predict([1.0] * workloads[n].num_steps, workloads[n].calls_per_step) for n in names}
        schedules, searches, reports = {}, {}, {}
        for name in names:
            share = Target(speedup=speedup) if speedup is not None else \
                Target(latency_ms=latency_ms * dense[name] / sum(dense.values()))
            say(f"tune: searching {name} ({workloads[name].num_steps} steps, {workloads[name].calls_per_step} "
                f"calls each) for {_describe(target)}")
            evaluator = Evaluator(workloads[name], sparse[name])
            calibration = Calibration(tuple(range(seeds)), decode_proxy=decode_candidates)
            result = search(workloads[name], tables[name], share, calibration=calibration,
                            settings=settings, sparse=sparse[name], evaluator=evaluator,
                            checkpoint=f"{stem}.{name}.checkpoint.json", progress=progress)
            report = _held_out(evaluator, result, tuple(range(seeds, seeds + held_out))) if held_out else None
            meta = {**result.schedule.meta, "tune": {
                "pipeline": type(pipe).__name__, "transformer": name, "num_inference_steps": steps,
                "held_out": None if report is None else report.to_json()}}
            schedules[name] = dataclasses.replace(result.schedule, meta=meta)
            searches[name], reports[name] = result, report
            result.plot(f"{stem}.png" if len(names) == 1 else f"{stem}.{name}.png")
        save_schedules(output, schedules)
        say(f"tune: wrote {output}")
        return TuneResult(schedules, searches, reports, output)


def _default_steps(pipe) -> int:
    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    if default is None or not isinstance(default.default, int):
        raise SearchError(f"{type(pipe).__name__} has no default num_inference_steps: pass num_inference_steps")
    return default.default


def _describe(target: Target) -> str:
    return f"{target.speedup:g}x" if target.speedup is not None else f"{target.latency_ms:g} ms"


def _cost_table(workload: PipelineWorkload, sparse: SparseModel, levels, forecast: bool, path: str, say) -> CostTable:
    """The table measured here before (an interrupted tune), or a new one, saved at `path`."""
    key = CostKey.here(sparse, workload)
    if os.path.exists(path):
        try:
            table = CostTable.load(path, expect=key)
            if table.levels != tuple(sorted({float(x) for x in levels})):
                raise CostTableError(f"it measured the levels {table.levels}")
            if (table.forecast_ms is not None) != forecast:
                raise CostTableError("it " + ("did not price" if forecast else "priced") + " forecasting steps")
            say(f"tune: cost table from {path}")
            return table
        except CostTableError as error:
            say(f"tune: not using {path} ({error}); measuring again")
    say(f"tune: measuring {workload.name}'s latency at each budget")
    table = profile(workload, levels=levels, sparse=sparse, forecast=forecast)
    table.save(path)
    return table


def _held_out(evaluator: Evaluator, result: SearchResult, seeds: tuple[int, ...]) -> HeldOut:
    uniform = None if result.uniform is None else evaluator(result.uniform.budgets, seeds, result.uniform.reuse)
    return HeldOut(seeds, evaluator(result.chosen.budgets, seeds, result.chosen.reuse), uniform)
