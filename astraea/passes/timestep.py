"""Which graph input is the diffusion timestep: the runtime reads it to know the step."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .token_axis import is_module_state, shape_of

MAX_TIMESTEP_NUMEL = 16  # one value per batch element


TIME_NAMES = ("timestep", "timesteps", "t", "sigma")


def find_timestep(gm: fx.GraphModule, token_source: fx.Node | None) -> fx.Node | None:
    """The data input (not a parameter or buffer) holding the diffusion time.

    An input named like a timestep wins, whatever its shape: [B], or one value per token
    ([B, N], Wan 2.2 TI2V) or per frame; one named `timestep` (or `t`, `sigma`) before one
    whose name only contains it. Otherwise the first small input with at most one
    value per batch element. The runner reads the largest value (tokens of a conditioning
    frame may sit at time 0).
    """
    candidates, named = [], []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or is_module_state(node) or node is token_source:
            continue
        value = node.meta.get("example_value")
        shape = shape_of(node)
        if not isinstance(value, torch.Tensor) or shape is None or value.is_complex() or value.dtype == torch.bool:
            continue
        if time_argument([_argument_name(node)]):
            named.append(node)
        elif len(shape) <= 1 and math.prod(shape) <= MAX_TIMESTEP_NUMEL:
            candidates.append(node)
    chosen = time_argument([_argument_name(n) for n in named])
    return next((n for n in named if _argument_name(n) == chosen), None) or (candidates or [None])[0]


def time_argument(names) -> str | None:
    """Which of a forward's argument names holds the diffusion time: one named `timestep` (or
    `timesteps`, `t`, `sigma`) before one whose name only contains "timestep" (MiniMax-H3's
    `timestep_indices`); None if none does."""
    names = list(names)
    return next((n for n in names if n in TIME_NAMES), None) or next((n for n in names if "timestep" in n), None)


def named_as_time(node: fx.Node) -> bool:
    """Whether a graph input comes from a forward argument named like the diffusion time."""
    return time_argument([_argument_name(node)]) is not None


def _argument_name(node: fx.Node) -> str:
    """The forward argument an input comes from: dynamo's `l_timestep_` or `l_kwargs_timestep_` -> `timestep`."""
    name = node.name.lower().removeprefix("l_").removesuffix("_")
    return name.removeprefix("kwargs_")
