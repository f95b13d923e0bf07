"""The one user-facing knob: a frozen, versioned configuration of the astraea backend.

`torch.compile(model, backend="astraea", options={...})` turns its options into an
`AstraeaConfig` with `AstraeaConfig.from_options`; `astraea.backend(config)` takes one
directly. Every field has a default measured to be sensible, so `options={"schedule": 0.5}`
is a complete configuration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .schedule import REUSES, Schedule, ScheduleError, check_budget

VERSION = 1

POLICIES = ("astraea", "delta", "random")
GROUPS = ("token", "spatial", "run")
CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "float8_e4m3fn")
LOWERINGS = ("auto", "inductor", "eager")
SKIPS = ("blocks", "output")


class ConfigError(ValueError):
    """An option the backend cannot honour; the message names the option."""


class AstraeaWarning(UserWarning):
    """The model (or part of it) runs dense, or its calls cannot be placed as they should; the message says why."""


def error_summary(e: Exception) -> str:
    """An exception as a warning quotes it: its type and its message's first line."""
    first_line = next(iter(str(e).strip().splitlines()), "")
    return f"{type(e).__name__}: {first_line[:300]}"


@dataclass(frozen=True)
class AstraeaConfig:
    """How astraea sparsifies a model.

    schedule: per-step budgets (see `Schedule.coerce` for what is accepted).
    policy: token selection: "astraea" (LSE x change + staleness penalty, the paper's score),
        "delta" (change only) or "random" (the baselines it must beat).
    group: select single tokens ("token"), a spatial position across all frames ("spatial"),
        or contiguous runs of `group_size` tokens ("run").
    full_steps: the first steps of every generation run dense whatever the schedule says.
    weight_signal, weight_penalty: w_a and w_b of the score S = w_a*S_sig + w_b*exp(n).
    seed: seeds the random policy and random tie-breaking.
    cache_dtype: storage of the per-block caches; "auto" keeps the hidden states' dtype.
    lowering: how the rewritten graph runs: "inductor" (generated Triton around our kernels),
        "eager" (the FX graph as is), or "auto" (Inductor on CUDA, eager elsewhere).
    skip: what a budget-0 step reuses: "blocks" (every block's cached contribution, added to
        the step's own input: the embeddings and the output head still run, with this step's
        timestep) or "output" (the branch's previous model output as it is).
    reuse: what a token a block does not recompute gets from its cache: "copy" (its last
        contribution) or "forecast" (extrapolated from its last two, per token, to the current
        step: `runtime/forecast.py`; one more tensor the size of the cache per block and branch).
        A schedule that says it per step (`Schedule.reuse`) overrides it step by step.
    cuda_graphs: on a GPU, replay each sparse call as a CUDA graph (one per selection size and
        guidance branch), so that its thousands of small launches cost one; with the "token"
        group and the astraea or delta policy, in one process. Costs a memory pool of about one
        call's activations.
    regional: lower each distinct region of the graph once (a block of a stack: every block
        runs the same compiled code with its own weights, caches and selection), instead of
        the whole graph at once. Lowering costs one block instead of all of them.
    """

    schedule: Schedule = field(default_factory=lambda: Schedule(constant=0.5))
    policy: str = "astraea"
    group: str = "token"
    group_size: int = 1
    full_steps: int = 1
    skip: str = "blocks"
    reuse: str = "copy"
    weight_signal: float = 1.0
    weight_penalty: float = 0.1
    seed: int = 0
    cache_dtype: str = "auto"
    lowering: str = "auto"
    cuda_graphs: bool = True
    regional: bool = True
    version: int = VERSION

    def __post_init__(self):
        try:
            object.__setattr__(self, "schedule", Schedule.coerce(self.schedule))
        except ScheduleError as e:
            raise ConfigError(f"option 'schedule': {e}") from e
        if self.policy not in POLICIES:
            raise ConfigError(f"option 'policy' must be one of {POLICIES}, got {self.policy!r}")
        if self.group not in GROUPS:
            raise ConfigError(f"option 'group' must be one of {GROUPS}, got {self.group!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ConfigError(f"option 'group_size' must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.full_steps, int) or self.full_steps < 0:
            raise ConfigError(f"option 'full_steps' must be a non-negative integer, got {self.full_steps!r}")
        for name in ("weight_signal", "weight_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"option {name!r} must be a non-negative number, got {value!r}")
        if self.skip not in SKIPS:
            raise ConfigError(f"option 'skip' must be one of {SKIPS}, got {self.skip!r}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"option 'cache_dtype' must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.reuse not in REUSES:
            raise ConfigError(f"option 'reuse' must be one of {REUSES}, got {self.reuse!r}")
        if self.forecasts and self.cache_dtype == "float8_e4m3fn":
            raise ConfigError("forecast reuse (option 'reuse' or the schedule's) needs caches that can be added to "
                              "in place; float8_e4m3fn caches cannot: use another cache_dtype, or reuse='copy'")
        if self.lowering not in LOWERINGS:
            raise ConfigError(f"option 'lowering' must be one of {LOWERINGS}, got {self.lowering!r}")
        for name in ("cuda_graphs", "regional"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"option {name!r} must be True or False, got {getattr(self, name)!r}")
        if self.version != VERSION:
            raise ConfigError(f"config version {self.version} is not supported; this astraea reads version {VERSION}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "AstraeaConfig":
        """Build a config from `torch.compile(..., options=...)`, refusing unknown keys."""
        options = dict(options or {})
        _refuse_unknown(options)
        return cls(**options)

    def replace(self, **changes) -> "AstraeaConfig":
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    def step_budget(self, step: int, time: float | None = None) -> float:
        """The budget the run uses at `step` (at `time`, for a schedule on the time axis):
        dense during the first `full_steps` steps."""
        budget = self.schedule.budget(step, time)
        return 1.0 if step < self.full_steps else check_budget(budget)

    def step_reuse(self, step: int, time: float | None = None) -> str:
        """What the tokens not recomputed at `step` get: the schedule's mode for it, else `reuse`."""
        return self.schedule.step_reuse(step, time) or self.reuse

    @property
    def forecasts(self) -> bool:
        """Whether any step may forecast: the blocks then keep a slope per token from the start."""
        return self.schedule.forecasts(self.reuse)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["schedule"] = self.schedule.to_json()
        return data


def _refuse_unknown(options: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(AstraeaConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown astraea option(s) {unknown}; known options: {sorted(known)}")
