"""Which graph input is the diffusion timestep: the runtime reads it to know the step."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from .token_axis import is_module_state, shape_of

MAX_TIMESTEP_NUMEL = 16  # one value per batch element


def find_timestep(gm: fx.GraphModule, token_source: fx.Node | None) -> fx.Node | None:
    """The data input (not a parameter or buffer) holding one value per batch element.

    When several inputs qualify, one named like a timestep wins; otherwise the first.
    """
    candidates = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or is_module_state(node) or node is token_source:
            continue
        value = node.meta.get("example_value")
        shape = shape_of(node)
        if not isinstance(value, torch.Tensor) or shape is None or value.is_complex():
            continue
        if len(shape) <= 1 and math.prod(shape) <= MAX_TIMESTEP_NUMEL:
            candidates.append(node)
    named = [n for n in candidates if "timestep" in n.name.lower() or n.name.lower() in ("l_t_", "l_sigma_")]
    return (named or candidates or [None])[0]
