"""Where a call of the model belongs: its denoising step and its guidance branch.

Placed from the timestep or the pipeline's announcements by `placement.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Call:
    step: int
    branch: int  # 0 for the first call of a step (the conditional branch, in diffusers' pipelines)
    new_generation: bool
    time: float | None = None  # the step's timestep, where a schedule on the time axis asks for it
