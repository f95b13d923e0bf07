"""Which tokens a block recomputes at this step.

Score of token i (the "astraea" policy): S = w_a * S_sig + w_b * exp(n_i), with
S_sig = LSE_i * change_i normalised by its mean (LSE: the token's attention log-sum-exp,
change: how much its block contribution moved when last recomputed) and n_i the steps
since it was last recomputed, so that every token is refreshed now and then. The "delta"
policy drops the LSE factor; "random" ignores the scores (baselines to measure against).
Selection is over single tokens, over spatial positions (a position in every frame at once),
or over contiguous runs of tokens; the chosen indices are returned sorted.
"""

from __future__ import annotations

import math

import torch

from ..config import AstraeaConfig, ConfigError
from .state import BlockState

MAX_STALE = 60  # exp(60) is still finite in fp32


MIN_SELECTED = 2  # compiled graphs treat the selection size as a symbol >= 2


def num_selected(budget: float, num_tokens: int) -> int:
    return max(min(MIN_SELECTED, num_tokens), min(num_tokens, round(budget * num_tokens)))


def scores(state: BlockState, config: AstraeaConfig, generator: torch.Generator) -> torch.Tensor:
    if config.policy == "random":
        return torch.rand(state.change.shape, generator=generator, device=state.change.device)
    signal = state.change if config.policy == "delta" else state.lse.clamp_min(0) * state.change
    signal = signal / signal.mean().clamp_min(1e-12)
    penalty = torch.exp(state.stale.clamp(max=MAX_STALE).float())
    return config.weight_signal * signal + config.weight_penalty * penalty


def select(
    score: torch.Tensor, k: int, config: AstraeaConfig, grid: tuple[int, ...] | None, shards: int = 1
) -> torch.Tensor:
    """Sorted int64 indices of about k < N tokens, grouped as the config asks.

    With `shards` > 1, k / shards tokens from each of that many equal contiguous shards: the
    selection each rank of a sequence-parallel run makes from its own shard.
    """
    if shards > 1:
        if config.group == "spatial":
            raise ConfigError("group='spatial' needs whole frames; it cannot select from token shards")
        if score.numel() % shards or k % shards:
            raise ValueError(f"{score.numel()} tokens and {k} selected do not split into {shards} equal shards")
        parts = score.chunk(shards)
        width = parts[0].numel()
        return torch.cat([select(p, k // shards, config, None) + i * width for i, p in enumerate(parts)])
    n = score.numel()
    if config.group == "token":
        chosen = score.topk(k).indices
    elif config.group == "spatial":
        frames = grid[0]
        plane = n // frames
        positions = score.view(frames, plane).sum(0).topk(max(1, math.ceil(k / frames))).indices
        chosen = (torch.arange(frames, device=score.device)[:, None] * plane + positions[None]).flatten()
    else:
        g = config.group_size
        padded = torch.nn.functional.pad(score, (0, (-n) % g))
        runs = padded.view(-1, g).sum(1).topk(max(1, math.ceil(k / g))).indices
        chosen = (runs[:, None] * g + torch.arange(g, device=score.device)[None]).flatten()
        chosen = chosen[chosen < n]
    return chosen.sort().values


def mark_selected(state: BlockState, idx: torch.Tensor) -> None:
    """Age every token by one step, except those recomputed now."""
    state.stale.add_(1)
    state.stale.index_fill_(0, idx, 0)
