"""Forecast reuse: a token a block does not recompute gets its contribution extrapolated to the
current step from its last two computations, instead of a copy of the last one.

TaylorSeer forecasts a skipped step's features from their recent differences, for the whole
step; here it is per block and per token, and the partial steps forecast too. The time unit is
the step, as in TaylorSeer's expansion. Each block keeps, beside its cache, a `slope`: how much
each token's contribution changes per step. The cache itself holds the forecast:

- before a call, every token's cached contribution moves on by its slope (`advance`): the
  cache then holds the last computed contribution plus the slope times the steps since, which
  is what the rewritten graph adds for the tokens it does not recompute, and what a skipped
  step adds for all of them;
- the graph's merge writes the selected tokens' fresh contributions over their forecasts (and
  scores how far they moved from the forecast: the tokens the forecast misses are chosen
  sooner);
- their slopes are corrected by the forecast's error over the steps it spanned:
  slope += (fresh - forecast) / steps, in two halves around the merge (`take_forecast`
  before it, `add_fresh` after), so nothing the size of a block's rows is kept in between.

Two equal contributions leave the slope at zero (the forecast is the copy); a contribution
linear in the step index is forecast exactly from its second computation on. The first call of
a generation fills the caches and leaves the slopes at zero.
"""

from __future__ import annotations

import torch

from .state import BlockState


def allocate(states: list[BlockState]) -> None:
    """A zero slope beside each cache that has none yet (the first call that forecasts)."""
    for state in states:
        if state.slope is None:
            state.slope = torch.zeros_like(state.cache)


def advance(states: list[BlockState]) -> None:
    """Move every cached contribution on by one step of its slope."""
    torch._foreach_add_([s.cache for s in states], [s.slope for s in states])


def _rows(state: BlockState, idx: torch.Tensor) -> tuple:
    """Indexes of the rows `idx` [S, K] in a [B, N, D] tensor."""
    batch = torch.arange(state.cache.shape[0], device=idx.device)[:, None]
    return batch, idx.expand(state.cache.shape[0], -1)


def take_forecast(state: BlockState, idx: torch.Tensor) -> torch.Tensor:
    """Before the merge, for the rows `idx` about to be recomputed: slope -= forecast / steps.
    Returns the steps [S, K, 1] each row's forecast spanned (read before the staleness resets)."""
    steps = (state.stale.gather(1, idx) + 1).to(state.slope.dtype)[..., None]
    at = _rows(state, idx)
    state.slope[at] = state.slope[at] - state.cache[at] / steps
    return steps


def add_fresh(state: BlockState, idx: torch.Tensor, steps: torch.Tensor) -> None:
    """After the merge wrote the fresh contributions: slope += fresh / steps."""
    at = _rows(state, idx)
    state.slope[at] = state.slope[at] + state.cache[at] / steps
