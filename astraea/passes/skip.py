"""The whole-step-skip form of a rewritten graph: every sparse block reuses all of its cache.

A budget-0 step can reuse either the previous model output as it is, or each block's cached
contribution (what the block last added to each token): the step's own input and timestep
still flow through the embeddings, the residual stream and the output head, and only the
blocks' work is skipped. The second is what TeaCache and MagCache reuse (the residual of
the whole block stack), here per block and per token, from the caches the sparse steps keep
anyway. This pass derives that graph from the sparse one: each `astraea::merge_rows(x, ...)`
becomes `x + cache`, and whatever only fed the blocks' fresh rows is dead code.

Its forecasting form adds each block's forecast instead, `x + (cache + slope * staleness)`
(runtime/forecast.py), reading the slope and staleness as inputs of its own: one pass over
them inside the graph, where moving every cache to its forecast and back around the graph
call cost 4.6 times an eager skip's work (`benchmarks/forecast_cost.py`, 81 frames on an H200).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops  # noqa: F401  (registers torch.ops.astraea.*)
from ..ops.signature import SKIP_SLOPE_INPUTS, call_arg
from .slopes import merges_with_slope_inputs


def reuse_blocks(sparse_gm: fx.GraphModule, forecast: bool = False) -> PassResult:
    """A copy of `sparse_gm` whose sparse blocks add their cache to their input and compute
    nothing else. Same signature (the per-block index and score inputs go unread), so the
    runner calls it as it calls the sparse graph; with `forecast`, each block adds its
    forecast, and the graph takes each block's `SKIP_SLOPE_INPUTS` after the others."""
    gm = copy.deepcopy(sparse_gm)
    graph = gm.graph
    placed = merges_with_slope_inputs(graph, SKIP_SLOPE_INPUTS if forecast else ())
    for merge, inputs in placed:
        x, cache = call_arg(merge, "x"), call_arg(merge, "cache")
        if forecast:
            with graph.inserting_before(merge):
                steps = graph.call_method("unsqueeze", (inputs["stale"], -1))
                ahead = graph.call_function(torch.mul, (inputs["slope"], steps))
                cache = graph.call_function(torch.add, (cache, ahead))
        with graph.inserting_before(merge):
            cast = graph.call_method("type_as", (cache, x))
            reused = graph.call_function(torch.add, (x, cast))
        reused.meta = dict(merge.meta)
        merge.replace_all_uses_with(reused)
        graph.erase_node(merge)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(placed))
