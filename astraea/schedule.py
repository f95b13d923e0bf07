"""Per-step token budgets: the speed/quality knob, and its JSON file format.

A schedule says, for each denoising step, which fraction of the tokens every sparse block
recomputes: 1.0 is the dense step, 0.0 a whole-step skip (what it reuses is the backend's
`skip` option). A schedule is either one budget for every step or one budget per step;
a file may also name the model structure it was searched for, so that it is refused on
another model instead of silently running with budgets that were never measured there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .jsonfile import load_json, save_json

# Backend options newer than some saved cost tables and schedules, with the behaviour those
# files measured.
OPTIONS_BEFORE_THEY_EXISTED = {"skip": "output"}

FORMAT = "astraea-schedule"
VERSION = 1


class ScheduleError(ValueError):
    """A schedule that cannot be used: bad budgets, wrong length, wrong model, bad file."""


def same_structure(stored: str, current: str) -> bool:
    """Whether a file made for model structure `stored` serves a model of structure `current`.
    A file written before the structure named the attention geometry holds the parameter part
    alone (16 hex digits) and serves every model with those parameter shapes."""
    return stored == current or ("-" not in stored and stored == current.split("-")[0])


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
    it. `model` is the structure hash of the model the schedule was made for (None: any).
    `meta` carries free-form provenance (search target, predicted latency, ...).
    """

    budgets: tuple[float, ...] | None = None
    constant: float | None = None
    model: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

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

    @property
    def num_steps(self) -> int | None:
        """Number of steps the schedule covers; None when one budget serves every step."""
        return None if self.budgets is None else len(self.budgets)

    def budget(self, step: int) -> float:
        """Budget of `step` (0-based); a ScheduleError when the run is longer than the schedule."""
        if self.constant is not None:
            return self.constant
        if step >= len(self.budgets):
            raise ScheduleError(
                f"schedule has {len(self.budgets)} steps but the run reached step {step + 1}; "
                "search or write a schedule for this number of inference steps"
            )
        return self.budgets[step]

    def mean_budget(self, num_steps: int | None = None) -> float:
        """Average budget over the run (the FLOP fraction of the sparse blocks, roughly)."""
        if self.constant is not None:
            return self.constant
        steps = self.budgets if num_steps is None else self.budgets[:num_steps]
        return sum(steps) / len(steps)

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
            "constant": self.constant,
            "model": self.model,
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "schedule") -> "Schedule":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ScheduleError(f"{source} is not an astraea schedule (missing format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ScheduleError(
                f"{source} has schedule version {data.get('version')!r}; this astraea reads version {VERSION}"
            )
        budgets = data.get("budgets")
        return cls(
            budgets=tuple(budgets) if budgets is not None else None,
            constant=data.get("constant"),
            model=data.get("model"),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: str | os.PathLike) -> None:
        save_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        data = load_json(path, "schedule file", ScheduleError)
        return cls.from_json(data, source=f"schedule file {os.fspath(path)!r}")

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
