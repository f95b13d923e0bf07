"""Rewrite each supported block into its token-sparse form.

For a block with input x (N tokens) and output y, and a per-call index tensor `idx` of the K
selected tokens, the rewritten block:
  1. runs the nodes that feed self-attention keys/values on all N rows, unchanged;
  2. runs every other node of the block on the K selected rows: a copy of the node whose
     token inputs from outside the copied set are gathered with `gather_tokens(dim, idx)`
     (the block input, key/value-side tensors, RoPE tables), and whose literal shapes name
     the token count as -1 so the same graph serves every K;
  3. replaces self-attention by `astraea::sparse_attention(q_rows, k_all, v_all)`, which also
     returns the rows' log-sum-exp;
  4. merges the K fresh rows with the block's cache (`astraea::merge_rows`): selected tokens
     get their fresh output, the others their input plus their cached contribution.
The graph gains, per sparse block, four inputs: idx, cache, change and lse (the last three
are per-context runtime state). Nothing in the rewritten graph depends on K, so budgets
change from step to step without recompiling.

idx is [S, K]: each of the batch's S = B samples selects its own tokens where every gathered
tensor has the batch on dim 0 (or 1 there: a table every sample shares, combined with tensors
of its own rank) and tokens elsewhere; otherwise S = 1, one selection for the whole batch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..runtime import ops, ulysses  # noqa: F401  (register torch.ops.astraea.*)
from ..runtime.ops import gather_tokens
from ..runtime.state import GRAPH_INPUTS
from .blocks import Block
from .token_axis import DTYPE_FROM_SECOND, TokenAxis, sdpa_args, shape_of

SIZED_METHODS = {"view", "reshape", "expand"}
# The sparse form of each self-attention op, and the keyword arguments it carries over;
# any other (an SDPA) becomes astraea::sparse_attention.
SPARSE_ATTENTION = {torch.ops.astraea.ulysses_attention: (torch.ops.astraea.ulysses_sparse_attention, ("group",))}


@dataclass(frozen=True)
class SparseBlockInputs:
    """Where a sparse block's runtime inputs sit in the rewritten graph's signature."""

    index: int
    module: str
    shape: tuple[int, ...]  # block input [B, N, D]
    dtype: torch.dtype
    shared_because: str | None = None  # why one selection serves the batch, if it does

    @property
    def samples(self) -> int:
        """S, the rows of idx and of the scores: B (a selection per sample) or 1 (one for the batch)."""
        return 1 if self.shared_because else self.shape[0]


def rewrite_blocks(gm: fx.GraphModule, axis: TokenAxis, blocks: list[Block]) -> tuple[PassResult, list]:
    """Make every block without a reason sparse; returns the pass result and the new inputs."""
    graph = gm.graph
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    replaced: dict[fx.Node, fx.Node] = {}
    inputs = []
    for block in blocks:
        if block.reason is not None:
            continue
        with graph.inserting_before(first_op):
            idx, cache, change, lse = (graph.placeholder(f"astraea_block{block.index}_{name}") for name in GRAPH_INPUTS)
        start = replaced.get(block.start, block.start)
        merged, shared_because = _sparse_copy(graph, axis, block, start, idx, cache, change, lse)
        block.end.replace_all_uses_with(merged, delete_user_cb=lambda u: u is not merged)
        replaced[block.end] = merged
        # The next block's start: gathered like any stream node.
        axis.tdim[merged] = axis.tdim[block.end]
        merged.meta["example_value"] = block.end.meta.get("example_value")
        for node in reversed(block.sparse):
            graph.erase_node(node)
        dtype = block.start.meta["example_value"].dtype
        inputs.append(SparseBlockInputs(block.index, block.module, shape_of(block.start), dtype, shared_because))
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(inputs)), inputs


def _sparse_copy(graph, axis, block, start, idx, cache, change, lse_state) -> tuple[fx.Node, str | None]:
    """The block's sparse form, ending in its merge; and, if its tokens cannot be gathered per
    sample, why."""
    copies: dict[fx.Node, fx.Node] = {}
    gathered: dict[tuple, fx.Node] = {}
    kv = {x for s in block.self_attention for x in sdpa_args(s)[1:3]}
    lse_rows = None
    batch = shape_of(block.start)[0]
    shared_because = None

    def gather(node, dim, consumer):
        nonlocal shared_because
        if shared_because is None and not _batch_leads(node, dim, consumer, batch):
            shared_because = f"{node.name} {list(shape_of(node) or ())} has no batch on dim 0 to gather its tokens per sample"
        if (node, dim) not in gathered:
            gathered[node, dim] = graph.call_function(gather_tokens, (node, dim, idx))
        return gathered[node, dim]

    with graph.inserting_before(block.end.next):
        for node in block.sparse:
            tables = dict(axis.tables.get(node, ()))
            keep = set(kv) if node in block.self_attention else set()
            if node.op == "call_method" and node.target in DTYPE_FROM_SECOND:
                keep |= set(node.all_input_nodes[1:])

            def remap(a, tables=tables, keep=keep, node=node):
                if a in copies:
                    return copies[a]
                if a in keep:
                    return a
                if isinstance(axis.tdim.get(a), int):
                    return gather(a, axis.tdim[a], node)
                if a in tables:
                    return gather(a, tables[a], node)
                return a

            args = fx.node.map_arg(node.args, remap)
            kwargs = fx.node.map_arg(node.kwargs, remap)
            if node in block.self_attention:
                q, k, v, _ = sdpa_args(node)
                op, carried = SPARSE_ATTENTION.get(node.target, (torch.ops.astraea.sparse_attention, ()))
                extra = {name: node.kwargs[name] for name in carried}
                pair = graph.call_function(op, (remap(q), k, v), {"scale": node.kwargs.get("scale"), **extra})
                copy = graph.call_function(operator.getitem, (pair, 0))
                if lse_rows is None:
                    lse_rows = graph.call_function(operator.getitem, (pair, 1))
            else:
                if node.op == "call_method" and node.target in SIZED_METHODS:
                    args = (args[0], *_sizes_with_free_token_dim(node, axis))
                elif node.op == "call_function" and node.target is torch.reshape:
                    args = (args[0], tuple(_sizes_with_free_token_dim(node, axis)))
                copy = graph.create_node(node.op, node.target, args, kwargs, name=f"{node.name}_rows")
            copy.meta["astraea_rows_of"] = node.name
            copies[node] = copy
        merged = graph.call_function(
            torch.ops.astraea.merge_rows, (start, copies[block.end], idx, cache, change, lse_rows, lse_state)
        )
    return merged, shared_because


def _batch_leads(node: fx.Node, dim: int, consumer: fx.Node, batch: int) -> bool:
    """Whether `node`'s rows along `dim` can be gathered per sample for `consumer`: its dim 0 is
    the batch, or 1 for a table shared by every sample that `consumer` combines with tensors of
    the table's own rank (so that dim 0 lines up with the batch), and tokens lie elsewhere."""
    if batch == 1:
        return True
    shape = shape_of(node)
    if shape is None or dim == 0:
        return False
    if shape[0] == batch:
        return True
    out = consumer.meta.get("example_value")
    return shape[0] == 1 and isinstance(out, torch.Tensor) and out.dim() == len(shape) and out.shape[0] == batch


def _sizes_with_free_token_dim(node: fx.Node, axis: TokenAxis) -> list[int]:
    """The node's output shape with the token dim as -1, so it fits any number of rows."""
    sizes = list(shape_of(node))
    sizes[axis.tdim[node]] = -1
    return sizes
