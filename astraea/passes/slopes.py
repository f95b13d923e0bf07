"""The sparse graph's forms that keep the forecasts' slopes (runtime/forecast.py): each block's
merge also refreshes its recomputed rows' slopes, and in the forecasting form gives the rows
it does not recompute `x + cache + slope * staleness`, all in the merge's one pass over the
cache (`astraea::merge_rows`). The copying graph is left as it is, so a model that never
forecasts runs exactly as before; these forms are lowered when a schedule first keeps slopes.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops  # noqa: F401  (registers torch.ops.astraea.*)
from ..ops.signature import MERGE_SLOPE_INPUTS, call_arg, set_call_args


def merges_with_slope_inputs(graph: fx.Graph, names: tuple[str, ...]) -> list[tuple[fx.Node, dict]]:
    """Each sparse block's merge, with new placeholders `names` of that block appended after
    the graph's inputs, block after block in the order the runner feeds blocks (their caches')."""
    merges = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.astraea.merge_rows]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    merges.sort(key=lambda merge: placeholders.index(call_arg(merge, "cache")))
    last, placed = placeholders[-1], []
    for merge in merges:
        block = call_arg(merge, "cache").name.removesuffix("_cache")
        inputs = {}
        for name in names:
            with graph.inserting_after(last):
                last = inputs[name] = graph.placeholder(f"{block}_{name}")
        placed.append((merge, inputs))
    return placed


def keep_slopes(sparse_gm: fx.GraphModule, forecast: bool) -> PassResult:
    """A copy of `sparse_gm` whose merges keep the slopes, forecasting where `forecast`; it takes
    each block's `MERGE_SLOPE_INPUTS` after the others."""
    gm = copy.deepcopy(sparse_gm)
    placed = merges_with_slope_inputs(gm.graph, MERGE_SLOPE_INPUTS)
    for merge, inputs in placed:
        set_call_args(merge, **inputs, forecast=forecast)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(placed))
