"""Fidelity of candidate schedules on calibration seeds, with the costly parts done once.

A candidate costs one sparse generation per seed; the search asks for hundreds. Saved:
- the dense reference of each seed is generated once, on the original uncompiled model (what
  a user compares against), and decoded once;
- a (schedule, seed) pair is generated once per set of backend options (changed with
  `SparseModel.update`); a search revisits many schedules. A score on the latents alone
  decodes nothing (a search's candidates; `tune` decodes only the ones it confirms); asked
  for on frames later, the pair is generated again with them;
- shared trajectory prefixes: schedules with the same leading budgets follow the same
  trajectory up to where they differ. The backend's per-block caches cannot be saved and
  restored, but a dense step recomputes every token, and two dense steps in a row leave
  state that depends only on the latent entering the first of them (the second refreshes
  each token's cached contribution and how much it moved since the first). So a candidate
  whose steps k and k+1 are dense resumes at step k from the latent that an earlier
  candidate with the same budgets before k had there; the backend takes the jump back up in
  timestep for a fresh generation, and the schedule, on the time axis, gives its step 0 the
  budget of step k.
  `steps_shareable` counts what saving and restoring the backend's state would spare: every
  step of a prefix some earlier generation on the same seed already ran.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from typing import Sequence

import torch

from .fidelity import FidelityReport, fidelity
from .sparse import SparseModel
from .workload import Trajectory, Workload

# Dense steps in a row after which the backend's state depends on the latent alone: the
# runtime keeps one step of history per token (its last contribution).
DENSE_RUN = 2


class Evaluator:
    """Scores schedules against the dense model; keeps counts of the work done and saved."""

    def __init__(
        self,
        workload: Workload,
        sparse: SparseModel,
        *,
        share_prefixes: bool | None = None,
        snapshot_bytes: int = 1 << 30,
    ):
        self.workload = workload
        self.sparse = sparse
        # A pipeline's own generation cannot start part-way; the random policy's stream would
        # not continue where a shared prefix resumes.
        self.share_prefixes = workload.resumable and sparse.config.policy != "random" if share_prefixes is None \
            else share_prefixes
        self.snapshot_bytes = snapshot_bytes
        self._references: dict[int, Trajectory] = {}
        self._scores: dict[tuple, FidelityReport] = {}  # per (schedule, seed, the sparse model's options)
        self._snapshots: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._snapshot_total = 0
        self._prefixes: set[tuple] = set()
        self.generations = 0
        self.steps_run = 0
        self.steps_shared = 0
        self.steps_shareable = 0

    def __call__(self, budgets: Sequence[float], seeds: Sequence[int],
                 reuse: Sequence[str] | None = None, decoded: bool = True) -> FidelityReport:
        """Mean fidelity over `seeds` of the schedule `budgets` (with each step's `reuse` mode,
        where given); on the latents alone unless `decoded` (then on the frames too, where the
        workload has a decoder or decodes its own generations)."""
        budgets = tuple(float(b) for b in budgets)
        if len(budgets) != self.workload.num_steps:
            raise ValueError(f"schedule has {len(budgets)} steps, the workload {self.workload.num_steps}")
        reuse = None if reuse is None else tuple(reuse)
        plan = budgets if reuse is None else tuple(zip(budgets, reuse))  # what keys a schedule and its prefixes
        options = json.dumps(self.sparse.options, sort_keys=True)
        decoded = decoded and self.workload.decodes
        reports = []
        for seed in seeds:
            report = self._scores.get((plan, seed, options))
            if report is None or (decoded and report.decoded is None):
                reference = self.reference(seed)
                run = self._generate(budgets, reuse, plan, seed, options, decoded)
                report = self._scores[plan, seed, options] = fidelity(
                    [run], [reference], self.workload.decoder if decoded else None,
                    [reference.decoded if decoded else None])
            reports.append(report if decoded else dataclasses.replace(report, decoded=None))
        return FidelityReport.mean(reports)

    def reference(self, seed: int) -> Trajectory:
        """The dense trajectory of `seed`, with its decoded frames when the generation decoded
        them or there is a decoder."""
        if seed not in self._references:
            run = self.workload.generate(self.workload.model, seed)
            decoder = self.workload.decoder
            if run.decoded is None and decoder is not None:
                with torch.no_grad():
                    run = Trajectory(run.noise, run.latent, decoder(run.latent))
            self._references[seed] = run
        return self._references[seed]

    def stats(self, since: dict | None = None) -> dict:
        """The work done, or done since an earlier `stats()`: sparse generations and steps run,
        steps that shared prefixes spared, and the fractions of the steps spared and of those
        restoring the backend's state at any step would spare."""
        counts = {"generations_run": self.generations, "steps_run": self.steps_run,
                  "steps_shared": self.steps_shared, "steps_shareable": self.steps_shareable}
        if since is not None:
            counts = {name: value - since[name] for name, value in counts.items()}
        steps = max(1, counts["steps_run"] + counts["steps_shared"])
        return {**counts, "shared_fraction": counts["steps_shared"] / steps,
                "shareable_fraction": counts["steps_shareable"] / steps}

    def _generate(self, budgets: tuple[float, ...], reuse, plan: tuple, seed: int, options: str,
                  decoded: bool) -> Trajectory:
        """One sparse generation (with its frames where `decoded`, if the workload decodes its
        own); prefixes (of `plan`: the budgets, with the reuse modes where given) are shared
        between runs of one seed and one set of backend options (`run` keys them)."""
        run = (seed, options)
        start = self._resume_point(budgets, plan, run)
        first = start[0] if start is not None else 0
        self.sparse.set_schedule(budgets, self.workload.step_times(), reuse)
        keep = self._snapshotter(budgets, plan, run, first)
        trajectory = self.workload.generate(self.sparse.module, seed, start=start, on_step=keep, decode=decoded)
        self.generations += 1
        self.steps_run += len(budgets) - first
        self.steps_shared += first
        shareable = 0  # the prefixes seen are closed under shortening: count up to the first unseen
        while shareable + 1 < len(budgets) and (plan[: shareable + 1], run) in self._prefixes:
            shareable += 1
        self.steps_shareable += shareable
        self._prefixes.update((plan[:k], run) for k in range(1, len(budgets)))
        return trajectory

    def _resumable(self, budgets: tuple[float, ...], step: int) -> bool:
        # Never the last step either: its timestep equals the one the previous generation
        # ended on, and the backend would not see a fresh generation.
        return 0 < step <= len(budgets) - DENSE_RUN and all(b == 1.0 for b in budgets[step : step + DENSE_RUN])

    def _resume_point(self, budgets, plan, run) -> tuple[int, torch.Tensor] | None:
        if not self.share_prefixes:
            return None
        for step in range(len(budgets) - DENSE_RUN, 0, -1):
            key = (plan[:step], run)
            if self._resumable(budgets, step) and key in self._snapshots:
                self._snapshots.move_to_end(key)
                return step, self._snapshots[key]
        return None

    def _snapshotter(self, budgets, plan, run, first):
        if not self.share_prefixes:
            return None

        def keep(step: int, latent: torch.Tensor) -> None:
            key = (plan[:step], run)
            if step > first and self._resumable(budgets, step) and key not in self._snapshots:
                self._snapshots[key] = latent.clone()
                self._snapshot_total += latent.numel() * latent.element_size()
                while self._snapshot_total > self.snapshot_bytes:
                    _, old = self._snapshots.popitem(last=False)
                    self._snapshot_total -= old.numel() * old.element_size()

        return keep
