"""The whole-step-skip form of a rewritten graph: every sparse block reuses all of its cache.

A budget-0 step can reuse either the previous model output as it is, or each block's cached
contribution (what the block last added to each token): the step's own input and timestep
still flow through the embeddings, the residual stream and the output head, and only the
blocks' work is skipped. The second is what TeaCache and MagCache reuse (the residual of
the whole block stack), here per block and per token, from the caches the sparse steps keep
anyway. This pass derives that graph from the sparse one: each `astraea::merge_rows(x, ...)`
becomes `x + cache`, and whatever only fed the blocks' fresh rows is dead code.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import ops  # noqa: F401  (registers torch.ops.astraea.*)
from ..ops.signature import call_arg


def reuse_blocks(sparse_gm: fx.GraphModule) -> PassResult:
    """A copy of `sparse_gm` whose sparse blocks add their cache to their input and compute
    nothing else. Same signature (the per-block index and score inputs go unread), so the
    runner calls it as it calls the sparse graph."""
    gm = copy.deepcopy(sparse_gm)
    graph = gm.graph
    merges = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.astraea.merge_rows]
    for merge in merges:
        x, cache = call_arg(merge, "x"), call_arg(merge, "cache")
        with graph.inserting_before(merge):
            cast = graph.call_method("type_as", (cache, x))
            reused = graph.call_function(torch.add, (x, cast))
        reused.meta = dict(merge.meta)
        merge.replace_all_uses_with(reused)
        graph.erase_node(merge)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(merges))
