"""Forecast reuse: a token a block does not recompute gets its contribution extrapolated to the
current step from its last two computations, instead of a copy of the last one.

TaylorSeer forecasts a skipped step's features from their recent differences, for the whole
step; here it is per block and per token, and the partial steps forecast too. The time unit is
the step, as in TaylorSeer's expansion. Each block keeps, beside its cache (the contribution
each token last got, whatever the step's mode), a `slope`: how much that contribution changed
per step between its last two computations. Whether a step copies or forecasts can change from
step to step (a schedule's per-step `reuse`), so the slopes are kept on every step once any
step may forecast:

- before the merge, the rows about to be recomputed start their new slope from the cached
  contribution: slope = -cache / steps (`start_slopes`), where steps is how many steps the
  cached one is old; after the merge wrote the fresh contribution, slope += fresh / steps
  (`add_fresh`): the slope is the last difference per step, and nothing the size of a block's
  rows is kept in between;
- a skipped step that forecasts runs the skip graph's forecasting form, which adds each
  block's cache plus slope times staleness to its input, reading them in the graph
  (passes/skip.py; lowered on the first such step, as the copying form on the first skip);
- a partial step that forecasts moves every cached contribution on by its slope times its
  staleness (`shift`, after the selection has reset the recomputed rows' staleness to 0, so
  they move by nothing), runs the graph, whose merge reads the forecast where it read the
  copy, and moves them back (`unshift`). The graph is unchanged, so a step's mode switches
  without recompiling.

Two equal contributions leave the slope at zero (the forecast is the copy); a contribution
linear in the step index is forecast exactly from its second computation on. The first call of
a generation fills the caches and leaves the slopes at zero. In a 16-bit cache the move and its
undoing round twice per forecasting step, about one unit in the last place each.
"""

from __future__ import annotations

import torch

from .state import BlockState


def allocate(states: list[BlockState]) -> None:
    """A zero slope beside each cache that has none yet (the first call that keeps slopes)."""
    for state in states:
        if state.slope is None:
            state.slope = torch.zeros_like(state.cache)


def shift(states: list[BlockState], sign: float = 1.0) -> None:
    """Every cached contribution moved on by its slope times its staleness, to its forecast at
    the current step (with sign -1, back): one pass over each cache and slope."""
    for s in states:
        s.cache.addcmul_(s.slope, s.stale[..., None].to(s.slope.dtype), value=sign)


def unshift(states: list[BlockState]) -> None:
    """The caches moved back from the forecasts to the contributions last computed (the rows
    recomputed in between are stale 0 and do not move)."""
    shift(states, -1.0)


def _rows(state: BlockState, idx: torch.Tensor) -> tuple:
    """Indexes of the rows `idx` [S, K] in a [B, N, D] tensor."""
    batch = torch.arange(state.cache.shape[0], device=idx.device)[:, None]
    return batch, idx.expand(state.cache.shape[0], -1)


def _every(state: BlockState, idx: torch.Tensor) -> bool:
    """Whether `idx` holds every token (a dense call's, in order: selection picks fewer): then
    whole tensors are updated in place, one pass each, where the rows' gather and scatter cost
    several (most of the slopes' upkeep, which is most of what a forecasting schedule adds)."""
    return idx.shape[-1] == state.cache.shape[1]


def start_slopes(state: BlockState, idx: torch.Tensor) -> torch.Tensor:
    """Before the selection ages the tokens, for the rows `idx` about to be recomputed:
    slope = -cache / steps. Returns the steps [S, K, 1] since each was last computed."""
    if _every(state, idx):
        steps = (state.stale + 1).to(state.slope.dtype)[..., None]
        torch.div(state.cache, -steps, out=state.slope)
        return steps
    steps = (state.stale.gather(1, idx) + 1).to(state.slope.dtype)[..., None]
    at = _rows(state, idx)
    state.slope[at] = -state.cache[at] / steps
    return steps


def add_fresh(state: BlockState, idx: torch.Tensor, steps: torch.Tensor) -> None:
    """After the merge wrote the fresh contributions: slope += fresh / steps."""
    if _every(state, idx):
        state.slope.addcdiv_(state.cache, steps)
        return
    at = _rows(state, idx)
    state.slope[at] = state.slope[at] + state.cache[at] / steps
