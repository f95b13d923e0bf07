"""A workload's transformer compiled once with the astraea backend, for many schedules.

Budgets are data to the compiled model, so one compilation serves every schedule a profile
or a search tries: the schedule is swapped between generations and the backend picks it up
at the next fresh generation's first call, without recompiling.
"""

from __future__ import annotations

from typing import Sequence

import torch

import astraea
from astraea.config import AstraeaConfig
from astraea.schedule import Schedule

from .ea import SearchError
from .workload import Workload


class SparseModel:
    """`module` is the compiled transformer; `set_schedule` changes its budgets."""

    def __init__(self, workload: Workload, config: AstraeaConfig | None = None):
        # The schedules run here carry their own dense steps, and a generation resumed
        # part-way must run its first step at the budget it asks for: no forced full steps.
        self.config = (config or AstraeaConfig()).replace(full_steps=0)
        report = astraea.explain(workload.model, **workload.example_inputs())
        if report.num_sparse_blocks == 0:
            why = report.reason or "; ".join(sorted({b.reason for b in report.blocks if b.reason}))
            raise SearchError(f"astraea runs this model dense ({why}): it has no budgets to measure or search")
        self.structure_hash = report.structure_hash
        self.backend = astraea.backend(self.config)
        self.module = torch.compile(workload.model, backend=self.backend)

    def set_schedule(self, budgets: Sequence[float]) -> None:
        self.config = self.config.replace(schedule=Schedule(budgets=tuple(budgets)))
        self.backend.config = self.config
        for runner in self.backend.runners:
            runner.config = self.config
