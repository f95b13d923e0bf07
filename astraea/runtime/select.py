"""Which tokens a block recomputes at this step.

Score of token i (the "astraea" policy): S = w_a * S_sig + w_b * exp(n_i), with
S_sig = LSE_i * change_i normalised by its mean (LSE: the token's attention log-sum-exp,
change: how much its block contribution moved when last recomputed) and n_i the steps
since it was last recomputed, so that every token is refreshed now and then. The "delta"
policy drops the LSE factor; "random" ignores the scores (baselines to measure against).
Selection is over single tokens, over spatial positions (a position in every frame at once),
or over contiguous runs of tokens; the chosen indices are returned sorted. Each sample of a
batch has its own scores and selection (prompts in one batch need different tokens), except
in a block the rewrite could not gather per sample, where one row serves the whole batch.
"""

from __future__ import annotations

import math

import torch

from ..config import AstraeaConfig
from .state import BlockState

MAX_STALE = 60  # exp(60) is still finite in fp32


MIN_SELECTED = 2  # compiled graphs treat the selection size as a symbol >= 2


def num_selected(budget: float, num_tokens: int) -> int:
    return max(min(MIN_SELECTED, num_tokens), min(num_tokens, round(budget * num_tokens)))


def scores(state: BlockState, config: AstraeaConfig, generator: torch.Generator) -> torch.Tensor:
    """[S, N] scores: one row per sample the block selects for (see `BlockState`)."""
    if config.policy == "random":
        return torch.rand(state.change.shape, generator=generator, device=state.change.device)
    signal = state.change if config.policy == "delta" else state.lse.clamp_min(0) * state.change
    signal = signal / signal.mean(-1, keepdim=True).clamp_min(1e-12)
    penalty = torch.exp(state.stale.clamp(max=MAX_STALE).float())
    return config.weight_signal * signal + config.weight_penalty * penalty


def select(score: torch.Tensor, k: int, config: AstraeaConfig, grid: tuple[int, ...] | None) -> torch.Tensor:
    """Sorted int64 indices [S, K] of about k < N tokens per row of `score` [S, N], grouped as
    the config asks. Every row gets the same count: grouped selections fill a partial group's
    place with the row's best other tokens.
    """
    n = score.shape[-1]
    if config.group == "token":
        return score.topk(k, -1).indices.sort(-1).values
    if config.group == "spatial":
        frames = grid[0]
        plane = n // frames
        positions = score.unflatten(-1, (frames, plane)).sum(-2).topk(max(1, math.ceil(k / frames)), -1).indices
        chosen = (torch.arange(frames, device=score.device)[:, None] * plane + positions[:, None, :]).flatten(1)
        return chosen.sort(-1).values
    g = config.group_size
    padded = torch.nn.functional.pad(score, (0, (-n) % g))
    runs = padded.unflatten(-1, (-1, g)).sum(-1).topk(max(1, math.ceil(k / g)), -1).indices
    chosen = (runs[:, :, None] * g + torch.arange(g, device=score.device)).flatten(1)
    # A run past the end is short: every token of the chosen runs, then the row's best others.
    picked = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, chosen, True)[:, :n]
    first = torch.where(picked, torch.inf, score)
    return first.topk(min(chosen.shape[-1], n), -1).indices.sort(-1).values


def mark_selected(state: BlockState, idx: torch.Tensor) -> None:
    """Age every token by one step, except those recomputed now (idx: [S, K])."""
    state.stale.add_(1)
    state.stale.scatter_(-1, idx, 0)
