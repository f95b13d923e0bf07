"""The measured cost model of the search: latency of one transformer call at each budget.

The paper's search held a FLOP proxy to a target; FLOPs miss what a budget costs on a real
GPU (gather and scatter, attention over all keys, kernel launch floors, a whole-step skip
costing almost nothing). So the search predicts a schedule's latency from a table measured
on the device itself: the sum over steps of the call latency at that step's budget, times
the calls per step (two with classifier-free guidance).

A table is only true for the model structure, input shapes, dtype, backend options, device
and software it was measured with; those form its key, and loading it anywhere else is refused, naming what
differs. Measuring needs one compile: budgets are data to the compiled model, so one
generation whose schedule visits every level in turn times them all.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..jsonfile import load_json, save_json
from ..schedule import OPTIONS_BEFORE_THEY_EXISTED, forecasting_steps, same_structure
from .sparse import SparseModel
from .timing import CallTimer
from .workload import Workload

FORMAT = "astraea-cost-table"
VERSION = 1
DEFAULT_LEVELS = tuple(i / 10 for i in range(11))
SOFTWARE = ("torch", "triton", "diffusers", "astraea")


class CostTableError(ValueError):
    """A cost table that cannot be used here: another model, device, shape or version."""


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # CPU latency depends on the thread count as much as on the chip.
    return f"{device.type} {platform.machine()} x{torch.get_num_threads()} threads"


def software_versions() -> dict[str, str | None]:
    versions = {}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def check_levels(levels: Sequence[float]) -> None:
    """A search needs the skip and the dense step among its levels."""
    if 0.0 not in levels or 1.0 not in levels:
        raise CostTableError(f"a cost table needs the levels 0 and 1, got {tuple(levels)}")


@dataclass(frozen=True)
class CostKey:
    """What a measured latency depends on."""

    model: str
    shapes: dict[str, tuple[int, ...]]
    dtype: str
    options: dict
    device: str
    versions: dict[str, str | None]

    @classmethod
    def here(cls, sparse: SparseModel, workload: Workload) -> "CostKey":
        """The key of `workload` compiled as `sparse`, on this machine."""
        return cls(
            model=sparse.structure_hash,
            shapes=workload.shapes(),
            dtype=str(workload.dtype).removeprefix("torch."),
            options=sparse.options,
            device=device_name(workload.device),
            versions=software_versions(),
        )

    def differences(self, other: "CostKey") -> list[str]:
        """Each field in which `other` differs from this key, as 'field: mine vs other'."""
        mine, theirs = self.to_json(), other.to_json()
        return [
            f"{name}: {mine[name]} vs {theirs[name]}" for name in mine
            if mine[name] != theirs[name] and not (name == "model" and same_structure(mine[name], theirs[name]))
        ]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "dtype": self.dtype,
            "options": dict(self.options),
            "device": self.device,
            "versions": dict(self.versions),
        }

    @classmethod
    def from_json(cls, data: dict) -> "CostKey":
        return cls(
            model=data["model"],
            shapes={k: tuple(v) for k, v in data["shapes"].items()},
            dtype=data["dtype"],
            options={**OPTIONS_BEFORE_THEY_EXISTED, **data["options"]},
            device=data["device"],
            versions=dict(data["versions"]),
        )


@dataclass(frozen=True)
class Prediction:
    """A predicted latency next to a measured one."""

    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        """Relative error of the prediction: positive when it promised too much speed."""
        return (self.measured_ms - self.predicted_ms) / self.measured_ms

    def __str__(self) -> str:
        return f"predicted {self.predicted_ms:.2f} ms, measured {self.measured_ms:.2f} ms ({self.error:+.1%})"


@dataclass(frozen=True)
class CostTable:
    """Median milliseconds of one transformer call at each budget level, and what each call
    costs a generation beyond its own time (the sampler's work between calls, host work the
    device does not wait for), measured on the same generations.

    Where forecasting was measured (`profile(forecast=True)`), two more columns price a schedule
    with a forecasting step, which keeps the forecasts' slopes on every call it computes (8% of
    a dense call on the reference model v2, when first measured): `forecast_ms`, each level's latency
    when the step forecasts the tokens it does not recompute, and `slopes_ms`, when it copies
    them while the slopes are kept. `latency_ms` stays a copying schedule's, which keeps none."""

    key: CostKey
    levels: tuple[float, ...]
    latency_ms: tuple[float, ...]
    call_overhead_ms: float = 0.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    forecast_ms: tuple[float, ...] | None = None
    slopes_ms: tuple[float, ...] | None = None

    def __post_init__(self):
        if len(self.levels) != len(self.latency_ms):
            raise CostTableError(f"{len(self.levels)} budget levels but {len(self.latency_ms)} latencies")
        if self.forecast_ms is not None and len(self.forecast_ms) != len(self.levels):
            raise CostTableError(f"{len(self.levels)} budget levels but {len(self.forecast_ms)} forecast latencies")
        if (self.slopes_ms is None) != (self.forecast_ms is None) or len(self.slopes_ms or self.levels) != len(self.levels):
            raise CostTableError("a table that prices forecasting steps needs, per level, both the forecasting "
                                 "step's latency and the copying step's with the slopes kept")
        check_levels(self.levels)

    def _level(self, budget: float) -> int:
        try:
            return self.levels.index(float(budget))
        except ValueError:
            raise CostTableError(f"budget {budget} was not measured; the table has levels {self.levels}") from None

    def only(self, levels: Sequence[float]) -> "CostTable":
        """This table restricted to some of its levels (0 and 1 among them): a search over
        whole steps only, dense or skipped, is one over `only((0, 1))`."""
        levels = tuple(sorted({float(x) for x in levels}))
        check_levels(levels)
        def pick(column):
            return None if column is None else tuple(column[self._level(level)] for level in levels)
        return CostTable(self.key, levels, pick(self.latency_ms), self.call_overhead_ms, self.meta,
                         pick(self.forecast_ms), pick(self.slopes_ms))

    def copying(self) -> "CostTable":
        """This table without its forecasting columns: a search over copying steps only."""
        return dataclasses.replace(self, forecast_ms=None, slopes_ms=None)

    def call_ms(self, budget: float) -> float:
        return self.latency_ms[self._level(budget)]

    def step_ms(self, calls_per_step: int = 1, reuse: str = "copy", slopes: bool = False) -> tuple[float, ...]:
        """Milliseconds of one step at each level: its calls, and what each costs around it. A
        copying step keeps the forecasts' slopes where `slopes` (a forecasting one always does)."""
        if reuse == "copy" and not slopes:
            latency = self.latency_ms
        elif self.forecast_ms is None:
            raise CostTableError("this cost table has no forecasting steps' latencies; measure one with "
                                 "`astraea profile --forecast`")
        else:
            latency = self.forecast_ms if reuse == "forecast" else self.slopes_ms
        return tuple(calls_per_step * (ms + self.call_overhead_ms) for ms in latency)

    def choices(self, calls_per_step: int = 1) -> tuple[tuple[float, ...], tuple[str, ...] | None, tuple[float, ...],
                                                        tuple[float, ...] | None]:
        """What a search's step may be, as (budgets, reuse modes or None, step milliseconds, step
        milliseconds in a schedule that forecasts somewhere or None): each level, and where
        forecasting was measured each level below 1 once copying and once forecasting."""
        if self.forecast_ms is None:
            return self.levels, None, self.step_ms(calls_per_step), None
        copy, forecast = self.step_ms(calls_per_step), self.step_ms(calls_per_step, "forecast")
        kept = self.step_ms(calls_per_step, slopes=True)
        rows = [(level, "copy", c, k) for level, c, k in zip(self.levels, copy, kept)]
        rows += [(level, "forecast", f, f) for level, f in zip(self.levels, forecast) if level < 1.0]
        levels, modes, ms, kept = zip(*sorted(rows))
        return levels, modes, ms, kept

    def predict(self, budgets: Sequence[float], calls_per_step: int = 1, reuse: Sequence[str] | None = None) -> float:
        """Predicted milliseconds of a generation with these budgets (and per-step reuse modes).
        A schedule that forecasts at some step keeps the slopes on every call, so each of its
        copying and dense steps is priced with them kept."""
        forecasts = forecasting_steps(budgets, reuse or ("copy",) * len(budgets))
        if not any(forecasts):
            copy = self.step_ms(calls_per_step)
            return sum(copy[self._level(b)] for b in budgets)
        kept, forecast = self.step_ms(calls_per_step, slopes=True), self.step_ms(calls_per_step, "forecast")
        return sum((forecast if f else kept)[self._level(b)] for b, f in zip(budgets, forecasts))

    def prediction(self, budgets: Sequence[float], measured_ms: float, calls_per_step: int = 1,
                   reuse: Sequence[str] | None = None) -> Prediction:
        """How far the prediction for a schedule is from a measured end-to-end generation."""
        return Prediction(self.predict(budgets, calls_per_step, reuse), measured_ms)

    def check(self, key: CostKey) -> None:
        """Refuse to predict latencies for a setting the table was not measured in."""
        differences = self.key.differences(key)
        if differences:
            raise CostTableError(
                "cost table was measured for another setting (table vs here): "
                + "; ".join(differences)
                + ". Measure one here with `astraea profile`."
            )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "key": self.key.to_json(),
            "levels": list(self.levels),
            "latency_ms": list(self.latency_ms),
            "call_overhead_ms": self.call_overhead_ms,
            **({"forecast_ms": list(self.forecast_ms), "slopes_ms": list(self.slopes_ms)}
               if self.forecast_ms is not None else {}),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data, source: str = "cost table") -> "CostTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CostTableError(f"{source} is not an astraea cost table (missing format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise CostTableError(
                f"{source} has cost table version {data.get('version')!r}; this astraea reads version {VERSION}"
            )
        if data.get("forecast_ms") is not None and data.get("slopes_ms") is None:
            raise CostTableError(f"{source} prices forecasting steps but not copying ones with the slopes kept (measured "
                                 "before astraea told the two apart); measure it again with `astraea profile --forecast`")
        return cls(
            key=CostKey.from_json(data["key"]),
            levels=tuple(data["levels"]),
            latency_ms=tuple(data["latency_ms"]),
            call_overhead_ms=float(data.get("call_overhead_ms", 0.0)),  # tables measured before it: none
            meta=dict(data.get("meta") or {}),
            forecast_ms=tuple(data["forecast_ms"]) if data.get("forecast_ms") is not None else None,
            slopes_ms=tuple(data["slopes_ms"]) if data.get("slopes_ms") is not None else None,
        )

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, expect: CostKey | None = None) -> "CostTable":
        """Read a table; with `expect`, refuse one measured for another setting."""
        path = os.fspath(path)
        data = load_json(path, "cost table", CostTableError, "; measure one with `astraea profile`")
        table = cls.from_json(data, source=f"cost table {path!r}")
        if expect is not None:
            table.check(expect)
        return table


def profiling_schedule(
    levels: Sequence[float], steps_per_level: int, forecast: bool = False
) -> tuple[tuple[float, ...], tuple[tuple[float, str] | None, ...], tuple[str, ...] | None]:
    """One generation that visits every level `steps_per_level` times, in rounds: a dense step,
    then one step at each level (with `forecast`, each level below 1 once copying and once
    forecasting, so every step keeps the slopes). Returns the budgets, per step the (level,
    reuse) it measures (None for the dense steps that open each round, which only refresh the
    caches), and the steps' reuse modes (None without `forecast`). A level's samples are spread
    over the generation, so a burst of load on the machine (another process, a CPU's other
    cores at work) lands on every level alike instead of on one level's run of steps: the
    ratios between levels, which the search relies on, stay right under load."""
    modes = ("copy", "forecast") if forecast else ("copy",)
    visits = [(level, mode) for level in levels for mode in (modes if level < 1.0 else ("copy",))]
    measured = (None, *visits) * steps_per_level
    budgets = tuple(1.0 if m is None else m[0] for m in measured)
    reuse = tuple("copy" if m is None else m[1] for m in measured) if forecast else None
    return budgets, measured, reuse


def profile(
    workload: Workload,
    *,
    levels: Sequence[float] = DEFAULT_LEVELS,
    steps_per_level: int = 3,
    repeats: int = 3,
    sparse: SparseModel | None = None,
    forecast: bool = False,
) -> CostTable:
    """Measure the compiled transformer's call latency at each budget level on this device
    (with `forecast`, also, in generations of their own, each level's in a schedule that
    forecasts, copying and forecasting: the search may then choose it).

    A first generation compiles and warms up; `repeats` more are timed call by call and each
    level's latency is the median of its `steps_per_level * repeats * calls_per_step` calls.
    Recompiling during the timed runs is an error: it would time the compiler, or eager code.
    """
    levels = tuple(sorted({float(x) for x in levels}))
    check_levels(levels)  # before compiling and measuring, not after
    sparse = sparse or SparseModel(workload)
    budgets, measured, _ = profiling_schedule(levels, steps_per_level)
    copying, walls = _time_visits(workload, sparse, budgets, measured, None, repeats)
    forecasting = None
    if forecast:
        forecasting, _ = _time_visits(workload, sparse, *profiling_schedule(levels, steps_per_level, True), repeats)
    calls = CostTable(
        key=CostKey.here(sparse, workload),
        levels=levels,
        latency_ms=tuple(copying[level, "copy"] for level in levels),
        forecast_ms=tuple(forecasting.get((level, "forecast"), forecasting[level, "copy"]) for level in levels)
        if forecasting else None,
        slopes_ms=tuple(forecasting[level, "copy"] for level in levels) if forecasting else None,
    )
    # What the calls' own timings leave out of the profiling generations' wall time, per call.
    wall, calls_ms = statistics.median(walls), calls.predict(budgets, workload.calls_per_step)
    return dataclasses.replace(
        calls,
        call_overhead_ms=max(0.0, (wall - calls_ms) / (len(budgets) * workload.calls_per_step)),
        meta={"steps_per_level": steps_per_level, "repeats": repeats, "calls_per_step": workload.calls_per_step,
              "profiling_generation": {"budgets": list(budgets), "wall_ms": walls, "calls_ms": calls_ms},
              "forecasting_generation": forecast},
    )


def load_or_profile(path: str | os.PathLike | None, workload: Workload, sparse: SparseModel,
                    forecast: bool = False) -> CostTable:
    """The table saved at `path`, refused (naming what differs) if it was measured for another
    setting than `sparse` on `workload` here; else one measured now and saved there (with no
    `path`, measured and not saved)."""
    if path is not None and os.path.exists(path):
        return CostTable.load(path, expect=CostKey.here(sparse, workload))
    table = profile(workload, sparse=sparse, forecast=forecast)
    if path is not None:
        table.save(path)
    return table


def _time_visits(workload: Workload, sparse: SparseModel, budgets: tuple[float, ...], measured: tuple,
                 reuse: tuple[str, ...] | None, repeats: int) -> tuple[dict, list[float]]:
    """Runs a profiling generation (`profiling_schedule`) once untimed, then `repeats` times
    with every call timed. Returns each visit's median milliseconds and the generations' walls."""
    sparse.set_schedule(budgets, reuse=reuse)
    timer = CallTimer(sparse.module, workload.device)
    workload.generate(timer, seed=0, num_steps=len(budgets))
    timer.take()
    samples: dict[tuple[float, str], list[float]] = {m: [] for m in measured if m is not None}
    walls = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for repeat in range(repeats):
            walls.append(workload.time_generation(timer, 1 + repeat, num_steps=len(budgets)))
            times = timer.take()
            if len(times) != len(budgets) * workload.calls_per_step:
                raise CostTableError(f"the profiling generation called the transformer {len(times)} times, not "
                                     f"{workload.calls_per_step} at each of its {len(budgets)} steps")
            for call, ms in enumerate(times):
                visit = measured[call // workload.calls_per_step]
                if visit is not None:
                    samples[visit].append(ms)
    return {visit: statistics.median(ms) for visit, ms in samples.items()}, walls
