"""Forecast reuse: a token a block does not recompute gets its contribution extrapolated to the
current step from its last two computations, instead of a copy of the last one.

TaylorSeer forecasts a skipped step's features from their recent differences, for the whole
step; here it is per block and per token, and the partial steps forecast too. The time unit is
the step, as in TaylorSeer's expansion. Each block keeps, beside its cache (the contribution
each token last got, whatever the step's mode), a `slope`: how much that contribution changed
per step between its last two computations. Whether a step copies or forecasts can change from
step to step (a schedule's per-step `reuse`), so the slopes are kept on every step once any
step may forecast, by forms of the graph that read them (each lowered on its first call; the
copying graphs stay as they are, so a model that never forecasts runs as before):

- a computed step runs the sparse graph's slope-keeping form (passes/slopes.py): each block's
  merge, as it writes a recomputed row's fresh contribution to the cache, writes its slope,
  (fresh - cached) / span, where span is how many steps the cached one is old (`span`, taken
  before the selection resets the staleness); in a forecasting step the rows it does not
  recompute get cache + slope * staleness, in the same pass over the cache;
- a skipped step that forecasts runs the skip graph's forecasting form (passes/skip.py),
  which adds each block's cache + slope * staleness to its input.

Nothing moves the caches themselves, so no rounding accumulates in them. Two equal
contributions leave the slope at zero (the forecast is the copy); a contribution linear in the
step index is forecast exactly from its second computation on. The first call of a generation
fills the caches and leaves the slopes at zero.
"""

from __future__ import annotations

import torch

from .state import BlockState


def allocate(states: list[BlockState]) -> None:
    """A zero slope beside each cache that has none yet (the first call that keeps slopes)."""
    for state in states:
        if state.slope is None:
            state.slope = torch.zeros_like(state.cache)


def span(state: BlockState, idx: torch.Tensor) -> torch.Tensor:
    """Before the selection resets their staleness: the steps [S, K] since each row of `idx` was
    last computed, over which its merge spreads the change of its contribution into its slope."""
    return (state.stale.gather(1, idx) + 1).float()
