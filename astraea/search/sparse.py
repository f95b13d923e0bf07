"""A workload's transformer compiled once with the astraea backend, for many schedules.

Budgets are data to the compiled model, so one compilation serves every schedule a profile
or a search tries: the schedule is swapped between generations and the backend picks it up
at the next fresh generation's first call, without recompiling. The other backend options
(token selection, cache dtype) stay fixed: latencies and fidelities are measured for them.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from astraea.backend import backend
from astraea.config import CACHE_DTYPES, GROUPS, POLICIES, REUSES, SKIPS, AstraeaConfig
from astraea.explain import explain
from astraea.runtime.announced import listen
from astraea.schedule import Schedule

from .ea import SearchError
from .workload import Workload


class SparseModel:
    """`module` is the compiled transformer; `set_schedule` changes its budgets."""

    def __init__(self, workload: Workload, config: AstraeaConfig | None = None):
        # The schedules run here carry their own dense steps, and a generation resumed
        # part-way must run its first step at the budget it asks for: no forced full steps.
        self.config = (config or AstraeaConfig()).replace(full_steps=0)
        report = explain(workload.model, **workload.example_inputs())
        if report.num_sparse_blocks == 0:
            why = report.reason or "; ".join(sorted({b.reason for b in report.blocks if b.reason}))
            raise SearchError(f"astraea runs this model dense ({why}): it has no budgets to measure or search")
        self.structure_hash = report.structure_hash
        self.backend = backend(self.config)
        listen(workload.model)  # where the workload's loop announces its steps, they place its calls
        self.module = torch.compile(workload.model, backend=self.backend)

    @property
    def options(self) -> dict:
        """The backend options a cost table or a schedule is measured for: all but the schedule
        (and the forced full steps, which a schedule states itself)."""
        return {k: v for k, v in self.config.to_json().items() if k not in ("schedule", "full_steps")}

    def update(self, **options) -> None:
        """Other backend options (token selection, reuse) without recompiling."""
        self.backend.update(**options)
        self.config = self.backend.config

    def set_schedule(self, budgets: Sequence[float], times: Sequence[float] | None = None,
                     reuse: Sequence[str] | None = None) -> None:
        """One budget per step, or on the time axis with `times` (the timestep of each step);
        with `reuse`, each step's reuse mode."""
        self.backend.set_schedule(Schedule(budgets=tuple(budgets), times=None if times is None else tuple(times),
                                           reuse=None if reuse is None else tuple(reuse)))
        self.config = self.backend.config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The backend options of `astraea profile`, `search` and `tune`: a table and a search must agree."""
    parser.add_argument("--policy", choices=POLICIES, default="astraea", help="token selection")
    parser.add_argument("--group", choices=GROUPS, default="token", help="selection granularity")
    parser.add_argument("--cache-dtype", choices=CACHE_DTYPES, default="auto", help="storage of the block caches")
    parser.add_argument("--skip", choices=SKIPS, default="blocks", help="what a skipped step (budget 0) reuses")
    parser.add_argument("--reuse", choices=REUSES, default="copy",
                        help="what a token not recomputed gets: its last contribution, or one forecast from its last two")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="launch every kernel of a call instead of replaying it as a CUDA graph")


def config_from_arguments(args: argparse.Namespace) -> AstraeaConfig:
    return AstraeaConfig(policy=args.policy, group=args.group, cache_dtype=args.cache_dtype, skip=args.skip,
                         reuse=args.reuse, cuda_graphs=args.cuda_graphs)


def from_arguments(workload: Workload, args: argparse.Namespace) -> SparseModel:
    return SparseModel(workload, config_from_arguments(args))
