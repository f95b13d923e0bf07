"""Per-step token budgets: the speed/quality knob, and its JSON file format.

A schedule says, for each denoising step, which fraction of the tokens every sparse block
recomputes: 1.0 is the dense step, 0.0 a whole-step skip (what it reuses is the backend's
`skip` option). A schedule is one budget for every step, one budget per step, or budgets on
the sampler's time axis: the budget of each searched step together with the time it ran at
(the transformer's timestep input), so that one schedule serves any step count, and a
transformer that runs only some of a pipeline's steps (Wan 2.2's low-noise expert). A step
at time t takes the budget of the searched step whose time span holds t (sample and hold:
the searched steps' times, from the first down to the last, each start a span). A file may
also name the model structure it was searched for, so that it is refused on another model
instead of silently running with budgets that were never measured there; a file may hold the
schedules of several transformers of one pipeline, by name.

A schedule of budgets per step may also say, per step, what the tokens a block does not
recompute get (`reuse`: "copy" or "forecast", as the backend option of that name, which it
overrides step by step): a skipped step may forecast while a partial one copies.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .jsonfile import load_json, save_json

# Backend options newer than some saved cost tables and schedules, with the behaviour those
# files measured.
OPTIONS_BEFORE_THEY_EXISTED = {"skip": "output", "reuse": "copy"}

REUSES = ("copy", "forecast")  # what a token not recomputed gets: its last contribution, or one extrapolated

FORMAT = "astraea-schedule"
VERSION = 2  # 2 added the time axis (`times`), files of several named schedules and `reuse`; 1 still loads
SET_FORMAT = "astraea-schedules"


class ScheduleError(ValueError):
    """A schedule that cannot be used: bad budgets, wrong length, wrong model, bad file."""


def same_structure(stored: str, current: str) -> bool:
    """Whether a file made for model structure `stored` serves a model of structure `current`.
    A file written before the structure named the attention geometry holds the parameter part
    alone (16 hex digits) and serves every model with those parameter shapes."""
    return stored == current or ("-" not in stored and stored == current.split("-")[0])


def forecasting_steps(budgets: Sequence[float], reuse: Sequence[str]) -> list[bool]:
    """Which steps forecast: those that recompute less than every token in "forecast" mode (a
    dense step's mode forecasts nothing). A schedule with one of them keeps the forecasts'
    slopes on every call; the runtime, the cost tables and the search all ask this."""
    return [m == "forecast" and b < 1.0 for b, m in zip(budgets, reuse)]


def check_budget(value: Any, where: str = "budget") -> float:
    """Return `value` as a float in [0, 1] or raise a ScheduleError naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{where} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ScheduleError(f"{where} must be in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Schedule:
    """Budgets per step.

    `budgets` holds one budget per step; when `constant` is set instead, every step uses
    it. `times`, when given, puts `budgets` on the time axis: the timestep each of them ran
    at, strictly decreasing. `model` is the structure hash of the model the schedule was made
    for (None: any). `meta` carries free-form provenance (search target, predicted latency, ...).
    `reuse`, when given, holds each step's reuse mode beside its budget ("copy" or "forecast").
    """

    budgets: tuple[float, ...] | None = None
    constant: float | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    times: tuple[float, ...] | None = None
    reuse: tuple[str, ...] | None = None

    def __post_init__(self):
        if (self.budgets is None) == (self.constant is None):
            raise ScheduleError("a schedule has either one constant budget or a list of budgets")
        if self.constant is not None:
            object.__setattr__(self, "constant", check_budget(self.constant, "schedule budget"))
        else:
            if len(self.budgets) == 0:
                raise ScheduleError("a schedule needs at least one step")
            budgets = tuple(
                check_budget(b, f"schedule budget of step {i}") for i, b in enumerate(self.budgets)
            )
            object.__setattr__(self, "budgets", budgets)
        if self.times is not None:
            object.__setattr__(self, "times", _check_times(self.times, self.budgets))
        if self.reuse is not None:
            object.__setattr__(self, "reuse", _check_reuse(self.reuse, self.budgets))

    @property
    def on_time_axis(self) -> bool:
        """Whether a step's budget follows its time (then any step count runs) rather than its index."""
        return self.times is not None

    def budget(self, step: int, time: float | None = None) -> float:
        """Budget of `step` (0-based), at `time` for a schedule on the time axis; a
        ScheduleError when the run is longer than a step-indexed schedule."""
        if self.constant is not None:
            return self.constant
        if self.times is not None:
            if time is None:
                raise ScheduleError("this schedule is on the sampler's time axis, but the model's calls show no "
                                    "timestep; use a step-indexed schedule (one budget per step)")
            return self.budgets[_span(self.times, time)]
        self.check_steps(step + 1)
        return self.budgets[step]

    def step_reuse(self, step: int, time: float | None = None) -> str | None:
        """What `step` reuses, where the schedule says it per step (None: the backend's option)."""
        if self.reuse is None:
            return None
        return self.reuse[_span(self.times, time) if self.times is not None else step]

    def forecasts(self, default: str = "copy") -> bool:
        """Whether some step forecasts: one that recomputes less than every token, in "forecast"
        mode, its own or else `default` (the backend's option). A dense step forecasts nothing,
        so a schedule that forecasts only there keeps no slopes."""
        budgets = (self.constant,) if self.constant is not None else self.budgets
        return any(forecasting_steps(budgets, self.reuse or (default,) * len(budgets)))

    def check_steps(self, num_steps: int) -> None:
        """Refuse a run of `num_steps` steps that a step-indexed schedule does not cover."""
        if self.budgets is not None and self.times is None and num_steps > len(self.budgets):
            raise ScheduleError(
                f"schedule has {len(self.budgets)} steps but the run reached step {num_steps}; "
                "search or write a schedule for this number of inference steps, or one on the time axis"
            )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def coerce(cls, value: Any) -> "Schedule":
        """Build a schedule from what a user passes in `options["schedule"]`.

        Accepts a Schedule, a number (one budget for all steps), a sequence of numbers (one per
        step), or the path of a schedule file.
        """
        if isinstance(value, Schedule):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(constant=value)
        if isinstance(value, Sequence):
            return cls(budgets=tuple(value))
        raise ScheduleError(
            f"schedule must be a budget, a list of budgets or a schedule file path, got {type(value).__name__}"
        )

    # ---- file format --------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "budgets": list(self.budgets) if self.budgets is not None else None,
            "times": list(self.times) if self.times is not None else None,
            **({"reuse": list(self.reuse)} if self.reuse is not None else {}),
            "constant": self.constant,
            "model": self.model,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "schedule") -> "Schedule":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ScheduleError(f"{source} is not an astraea schedule (missing format {FORMAT!r})")
        if data.get("version") not in (1, VERSION):
            raise ScheduleError(
                f"{source} has schedule version {data.get('version')!r}; this astraea reads versions 1 to {VERSION}"
            )
        budgets, times, reuse = data.get("budgets"), data.get("times"), data.get("reuse")
        return cls(
            budgets=tuple(budgets) if budgets is not None else None,
            constant=data.get("constant"),
            model=data.get("model"),
            meta=dict(data.get("meta") or {}),
            times=tuple(times) if times is not None else None,
            reuse=tuple(reuse) if reuse is not None else None,
        )

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "Schedule":
        """Read a schedule file; `name` picks one schedule of a file that holds several (one per
        transformer of a pipeline), and a file of one schedule needs none. A path may also name
        it after a '#': "schedule.json#transformer_2"."""
        path = os.fspath(path)
        if name is None and "#" in path and not os.path.exists(path):
            path, name = path.rsplit("#", 1)
        data = load_json(path, "schedule file", ScheduleError)
        source = f"schedule file {path!r}"
        if isinstance(data, dict) and data.get("format") == SET_FORMAT:
            schedules = data.get("schedules")
            if not isinstance(schedules, dict) or not schedules:
                raise ScheduleError(f"{source} holds no schedules")
            if name is None or name not in schedules:
                what = "holds one schedule per transformer" if name is None else f"has no schedule named {name!r}"
                raise ScheduleError(f"{source} {what}: {sorted(schedules)}; name one, as in "
                                    f"'{path}#{sorted(schedules)[0]}' or Schedule.load(path, name)")
            return cls.from_json(schedules[name], source=f"{source} ({name})")
        if name is not None:
            raise ScheduleError(f"{source} holds one schedule, not one named {name!r}")
        return cls.from_json(data, source=source)

    def searched_option(self, name: str):
        """The backend option `name` the search that wrote this schedule ran with (None when
        the schedule did not come from a search)."""
        options = self.meta.get("search", {}).get("options")
        return None if options is None else options.get(name, OPTIONS_BEFORE_THEY_EXISTED.get(name))

    def check_model(self, structure_hash: str) -> None:
        """Refuse a schedule made for another model structure."""
        if self.model is not None and not same_structure(self.model, structure_hash):
            raise ScheduleError(
                f"schedule was made for model structure {self.model}, but this model is {structure_hash}; "
                "search a schedule for this model (astraea search) or drop the 'model' field"
            )


def save_schedules(path: str | os.PathLike, schedules: dict[str, Schedule]) -> None:
    """Write the schedules of several transformers of one pipeline, by name, in one file; a
    single schedule is written as a plain schedule file."""
    if len(schedules) == 1:
        next(iter(schedules.values())).save(path)
    else:
        save_json(path, {"format": SET_FORMAT, "version": VERSION,
                         "schedules": {name: s.to_json() for name, s in schedules.items()}})


def _check_times(times, budgets) -> tuple[float, ...]:
    if budgets is None or len(times) != len(budgets):
        raise ScheduleError(f"a schedule on the time axis needs one time per budget, got {len(times)} times for "
                            f"{None if budgets is None else len(budgets)} budgets")
    times = tuple(float(t) if not isinstance(t, bool) and isinstance(t, (int, float)) else math.nan for t in times)
    if not all(math.isfinite(t) for t in times) or any(a <= b for a, b in zip(times, times[1:])):
        raise ScheduleError(f"a schedule's times must be finite numbers, strictly decreasing, got {times}")
    return times


def _check_reuse(reuse, budgets) -> tuple[str, ...]:
    if budgets is None or isinstance(reuse, str) or len(reuse) != len(budgets):
        raise ScheduleError(f"a schedule's reuse needs one mode per budget, got {reuse!r} for "
                            f"{None if budgets is None else len(budgets)} budgets")
    bad = sorted({repr(r) for r in reuse if r not in REUSES})
    if bad:
        raise ScheduleError(f"a schedule's reuse modes must be among {REUSES}, got {', '.join(bad)}")
    return tuple(reuse)


def _span(times: tuple[float, ...], time: float) -> int:
    """The searched step whose span holds `time`: the last whose time is at or above it (the
    first step's span reaches up, the last's down). A time equal to a searched one up to float32
    rounding (how the transformer receives it) counts as equal."""
    tolerance = 1e-6 * max(abs(times[0]), abs(times[-1]), 1.0)
    return sum(1 for t in times[1:] if t >= time - tolerance)
