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
        if "timestep" in node.name.lower() or _argument_name(node) in TIME_NAMES:
            named.append(node)
        elif len(shape) <= 1 and math.prod(shape) <= MAX_TIMESTEP_NUMEL:
            candidates.append(node)
    # `timestep` itself before inputs that only mention it (MiniMax-H3's `timestep_indices`)
    named.sort(key=lambda n: _argument_name(n) not in TIME_NAMES)
    return (named or candidates or [None])[0]


def _argument_name(node: fx.Node) -> str:
    """The forward argument an input comes from: dynamo's `l_timestep_` or `l_kwargs_timestep_` -> `timestep`."""
    name = node.name.lower().removeprefix("l_").removesuffix("_")
    return name.removeprefix("kwargs_")
