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
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops  # noqa: F401  (registers torch.ops.astraea.*)
from ..ops.signature import SKIP_SLOPE_INPUTS, call_arg
from .slopes import merges_with_slope_inputs


def _video_read_directly(graph: fx.Graph) -> None:
    """On a joint stream each block reads its video segment back out of a concatenation (the
    model's join of text and video, or the stream the last merge rebuilt): read that part itself,
    so that the small segments, which only feed the blocks' attention and are dropped at the
    end, are dead code in the skip graph."""
    for stream in list(graph.nodes):
        parts = _cat_parts(stream)
        if not parts:
            continue
        for user in list(stream.users):
            index = user.args[1] if user.target is operator.getitem and len(user.args) == 2 else None
            if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice):
                rows = index[1].indices(parts[-1][2])[:2]
                found = next((p for p, a, b in parts if (a, b) == rows and index[1].step in (None, 1)), None)
                if found is not None:
                    user.replace_all_uses_with(found)


def _cat_parts(stream: fx.Node) -> list[tuple[fx.Node, int, int]]:
    """(part, first row, end) of a concatenation along the rows (dim 1) whose parts' row counts are
    known (the model's join of text and video, or the stream a merge rebuilt)."""
    if stream.op != "call_function" or stream.target is not torch.cat:
        return []
    pieces, dim = stream.args[0], stream.args[1] if len(stream.args) > 1 else stream.kwargs.get("dim", 0)
    if dim != 1:
        return []
    out, at = [], 0
    for piece in pieces:
        value = piece.meta.get("example_value") if isinstance(piece, fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            return []
        out.append((piece, at, at + int(value.shape[1])))
        at += int(value.shape[1])
    return out


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
    _video_read_directly(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(placed))
