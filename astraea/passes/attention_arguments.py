"""SDPA's options passed by position become keywords, so one reading serves every call.

Research code often passes them by position (`F.scaled_dot_product_attention(q, k, v, mask, 0.0,
False)`); the analysis and the rewrite read query, key and value by position and the options by
name. This pass rewrites each SDPA call to that form with torch's own schema of the function
(`normalize_function`), leaving out options at their defaults.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

TORCH_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def name_attention_options(gm: fx.GraphModule) -> int:
    """Pass every SDPA option in `gm` by keyword; returns how many calls changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in TORCH_SDPA or len(node.args) <= 3:
            continue
        named = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        if named is None:
            continue
        kwargs = dict(named.kwargs)
        inputs = tuple(kwargs.pop(name) for name in ("query", "key", "value"))
        node.args = inputs
        node.kwargs = {k: v for k, v in kwargs.items() if not _at_default(k, v)}
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _at_default(name: str, value) -> bool:
    default = DEFAULTS.get(name, ...)
    return value is default or (isinstance(value, (int, float)) and not isinstance(value, fx.Node) and value == default)
