"""Which denoising step and which guidance branch (cond / uncond) a call belongs to.

Within a generation the timestep falls from call to call. Calls that share a timestep belong
to the same step, and the j-th of them is branch j: diffusers pipelines call the
transformer for the conditional branch first and the unconditional one second (Wan and
others), or once with both in the batch (branch 0 only). A timestep higher than the
current step's starts a new generation, as does a change of input shapes (which also gives
a new compiled graph, and so a new tracker).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    step: int
    branch: int
    new_generation: bool


class StepTracker:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._timestep: float | None = None
        self._step = -1
        self._calls_in_step = 0
        self.calls = 0  # calls placed since the tracker was made or reset

    def observe(self, timestep: float | None) -> Call:
        """Place one transformer call; `None` (no timestep input) makes every call a step."""
        self.calls += 1
        new = self._timestep is None or (timestep is not None and timestep > self._timestep)
        if new:
            self._step, self._calls_in_step = 0, 0
        elif timestep is not None and timestep == self._timestep:
            self._calls_in_step += 1
        else:
            self._step, self._calls_in_step = self._step + 1, 0
        self._timestep = timestep if timestep is not None else float("-inf")
        return Call(step=self._step, branch=self._calls_in_step, new_generation=new)
