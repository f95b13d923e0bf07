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

import functools
import operator

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import ulysses  # noqa: F401  (registers torch.ops.astraea.ulysses_*)
from ..ops.signature import NO_SLOPES, BlockInputs, SparseBlockInputs
from ..ops.sparse import frame_positions, gather_folded_tokens, gather_tokens, pad_channels, segment_rows, split_rows
from .blocks import Block
from . import rules
from .layout import Layout
from .regions import BLOCK_END
from .rules import DTYPE_FROM_SECOND, sdpa_args, shape_of
from .token_axis import TokenAxis

SIZED_METHODS = {"view", "reshape", "expand"}
VIDEO_SEGMENT = "astraea_video_segment"  # node meta: the video segment of a joint stream's block input, merged
# The sparse form of each self-attention op, and the keyword arguments it carries over;
# any other (an SDPA) becomes astraea::sparse_attention.
SPARSE_ATTENTION = {torch.ops.astraea.ulysses_attention: (torch.ops.astraea.ulysses_sparse_attention, ("group",))}


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
            placed = BlockInputs(*(graph.placeholder(f"astraea_block{block.index}_{name}") for name in BlockInputs._fields))
        start = replaced.get(block.start, block.start)
        merged, shared_because = _SparseCopy(graph, axis, block, placed).build(start)
        block.end.replace_all_uses_with(merged, delete_user_cb=lambda u: u is not merged)
        replaced[block.end] = merged
        # The next block's start: gathered like any stream node.
        axis.tdim[merged] = axis.tdim[block.end]
        if block.end in axis.layout:
            axis.layout[merged] = axis.layout[block.end]
        merged.meta["example_value"] = _contiguous(block.end.meta.get("example_value"))
        merged.meta[BLOCK_END] = block.module
        for node in reversed(block.row_nodes):
            graph.erase_node(node)
        dtype = block.start.meta["example_value"].dtype
        shape, layout = _batched(shape_of(block.start)), axis.layout_of(block.start)
        # the video tokens' rows: a joint stream's too, every (frame, position) pair of a flat one
        cached = (shape[0], shape[1] if layout.folded else layout.sizes[layout.video], shape[2])
        inputs.append(SparseBlockInputs(block.index, block.module, cached, dtype, shared_because))
    graph.lint()
    gm.recompile()
    return PassResult(gm, bool(inputs)), inputs


class _SparseCopy:
    """The sparse form of one block: a copy of each sparse node on the selected rows, placed
    right after the node it copies, ending in the block's merge.

    A tensor whose token axis joins small segments to the video tokens (text for joint
    attention) has, in its rows form, every row of the small segments and the selected video
    rows, in the same order; slices and splits that pick segments out of it are rewritten to
    the rows form's bounds. Users after the block that read only small segments (the text
    stream) are pointed at the rows form, which holds those segments complete.
    """

    def __init__(self, graph, axis: TokenAxis, block: Block, inputs: BlockInputs):
        self.graph, self.axis, self.block, self.inputs = graph, axis, block, inputs
        self.copies: dict[fx.Node, fx.Node] = {}
        self.gathered: dict[tuple, fx.Node] = {}
        self.lifted: dict[tuple, fx.Node] = {}  # (table, dims put before it): the table at its reader's rank
        self.indices: dict[Layout, fx.Node] = {}
        self.frame_positions: fx.Node | None = None
        self.batch = shape_of(block.start)[0]
        self.shared_because: str | None = None
        tokens = [n for n in block.region if isinstance(axis.tdim.get(n), int)]
        if any(axis.layout_of(n).folded for n in tokens):
            # [B, N, F, C] regrouped as [B * N, F, C]: each token's frames must all be selected,
            # and the rows form regroups the same way only if every sample selects the same rows.
            self.shared_because = "its tokens are regrouped with the frames (factorised attention)"
        elif any(axis.tdim[n] == 0 for n in tokens):
            # [N, B, C] (sequence-first attention) or one sample's [N, C] (a loop over the batch):
            # the rows form indexes dim 0 with one set of rows.
            self.shared_because = ("its tokens come first in a tensor of the block (sequence-first attention, as "
                                   "nn.MultiheadAttention computes it, or a loop over the samples)")

    def build(self, start) -> tuple[fx.Node, str | None]:
        graph, block, axis = self.graph, self.block, self.axis
        kv = {x for s in block.self_attention for x in sdpa_args(s)[1:3]}
        lse_rows = None
        region = set(block.region)
        for node in block.row_nodes:
            tables = {a: (dim, layout) for a, dim, layout in axis.tables.get(node, ())}
            keep = set(kv) if node in block.self_attention else set()
            if node.op == "call_method" and node.target in DTYPE_FROM_SECOND:
                keep |= set(node.all_input_nodes[1:])
            remap = functools.partial(self.remap, tables=tables, keep=keep, consumer=node)
            with graph.inserting_before(node.next):
                if node in block.self_attention or _mask_has_rows(node, remap):
                    q, k, v, mask = sdpa_args(node)
                    if node not in block.self_attention:  # keys and values as a copy of the node would read them
                        k, v = remap(k), remap(v)
                    op, carried = SPARSE_ATTENTION.get(node.target, (torch.ops.astraea.sparse_attention, ()))
                    extra = {name: node.kwargs[name] for name in carried}
                    if mask is not None:
                        extra["attn_mask"] = remap(mask)
                    pair = graph.call_function(op, (remap(q), k, v), {"scale": node.kwargs.get("scale"), **extra})
                    copy = graph.call_function(operator.getitem, (pair, 0))
                    if lse_rows is None and node in block.self_attention:  # [B, H, query rows]: the video
                        # rows' part, for the scores
                        lse_rows = graph.call_function(operator.getitem, (pair, 1))
                        layout = axis.layout_of(q)
                        if not layout.only_video:
                            video = _rows_slice(layout, layout.video, layout.video + 1)
                            lse_rows = graph.call_function(operator.getitem, (lse_rows, (Ellipsis, video)))
                        lse_rows = _unfolded(graph, lse_rows, q, _batched(shape_of(block.start))[0],
                                             axis.frames)
                else:
                    copy = self.copy_node(node, remap)
            copy.meta["astraea_rows_of"] = node.name
            self.copies[node] = copy
            if node is not block.end:
                for user in list(node.users):
                    if user not in region:
                        self.leave(node, user)
        end = self.copies[block.end]
        layout = axis.layout_of(block.start)
        joint = not layout.unfold().only_video  # a flat stream of frames merges whole
        unbatched = len(shape_of(block.start)) == 2
        with graph.inserting_before(end.next):
            x, rows = start, end
            if unbatched:  # merged as a batch of one
                x, rows = (graph.call_method("unsqueeze", (a, 0)) for a in (x, rows))
            if joint:  # a joint stream: its video segment merged, the small segments as computed
                x = graph.call_function(operator.getitem, (start, _segment(layout, layout.video)))
                x.meta[VIDEO_SEGMENT] = True
                rows = graph.call_function(operator.getitem, (end, (slice(None), _rows_slice(layout, layout.video,
                                                                                               layout.video + 1))))
            merged = graph.call_function(
                torch.ops.astraea.merge_rows,
                (x, rows, self.inputs.idx, self.inputs.cache, self.inputs.change, lse_rows, self.inputs.lse,
                 *NO_SLOPES),
            )
            if unbatched:
                merged = graph.call_method("squeeze", (merged, 0))
            if joint:
                merged = graph.call_function(torch.cat, (self.stream_parts(layout, end, merged), 1))
        return merged, self.shared_because

    def stream_parts(self, layout: Layout, end: fx.Node, merged: fx.Node) -> list[fx.Node]:
        """The segments of a joint stream after its block: each small one from the block's rows form,
        the video from the merge; each with its dense value, so the skip graph can tell which rows a
        later slice of the stream reads."""
        dense, parts = self.block.end.meta.get("example_value"), []
        for i in range(len(layout.sizes)):
            part = merged if i == layout.video else self.graph.call_function(
                operator.getitem, (end, (slice(None), _rows_slice(layout, i, i + 1))))
            if isinstance(dense, torch.Tensor):
                part.meta["example_value"] = _contiguous(dense[_segment(layout, i)])
            parts.append(part)
        return parts

    def copy_node(self, node, remap) -> fx.Node:
        args = fx.node.map_arg(node.args, remap)
        kwargs = fx.node.map_arg(node.kwargs, remap)
        axis, t = self.axis, self.axis.tdim.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.target in (operator.getitem, operator.setitem) and isinstance(t, int) \
                and isinstance(node.args[1], (slice, tuple)):
            args = (args[0], self.rows_index(node.args[0], node.args[1]), *args[2:])
        elif isinstance(t, int) and isinstance(axis.tdim.get(node), tuple) and _splits_tokens(node, t):
            return self.graph.call_function(split_rows, (args[0], t, self.rows_bounds(node, t)), name=f"{node.name}_rows")
        elif node.op == "call_method" and node.target in SIZED_METHODS:
            args = (args[0], *_sizes_with_free_token_dim(node, axis))
        elif node.op == "call_function" and node.target is torch.reshape:
            args = (args[0], tuple(_sizes_with_free_token_dim(node, axis)))
        elif node.target in rules.PAD and rules.pad_arguments(node)[1] == "constant":
            widths, _, value = rules.pad_arguments(node)
            return self.graph.call_function(pad_channels, (args[0], widths, value), name=f"{node.name}_rows")
        return self.graph.create_node(node.op, node.target, args, kwargs, name=f"{node.name}_rows")

    def remap(self, a, *, tables, keep, consumer):
        axis = self.axis
        if a in self.copies:
            return self.copies[a]
        if a in keep:
            return a
        if isinstance(axis.tdim.get(a), int):
            return self.gather(a, axis.tdim[a], axis.layout_of(a), consumer)
        if a in tables:
            return self.gather(a, *tables[a], consumer)
        return a

    def gather(self, node, dim, layout: Layout, consumer):
        """`node`'s rows for the selection, along `dim` (its token axis, of `layout`)."""
        if not layout.has_video:
            return node  # small segments only: every row is computed
        if layout.folded:  # a row per (sample or frame, token); one selection for the batch
            return self.graph.call_function(gather_folded_tokens, (node, dim, self.positions(), layout.total))
        lead = _broadcast_lead(node, consumer, self.batch)
        if lead:  # a table read by broadcasting at a lower rank: read at the op's rank, its dim 0 then the batch's
            if (node, lead) not in self.lifted:
                self.lifted[node, lead] = self.graph.call_function(operator.getitem, (node, (None,) * lead + (...,)))
            node, dim = self.lifted[node, lead], dim + lead
        elif self.shared_because is None and not _batch_leads(node, dim, consumer, self.batch):
            self.shared_because = f"{node.name} {list(shape_of(node) or ())} has no batch on dim 0 to gather its tokens per sample"
        if (node, dim) not in self.gathered:
            self.gathered[node, dim] = self.graph.call_function(gather_tokens, (node, dim, self.index(layout)))
        return self.gathered[node, dim]

    def positions(self) -> fx.Node:
        """The selected tokens as positions in a frame: idx itself, or, where the token source
        is a flat stream of frames (every frame selecting the same positions, frame-major), the
        first frame's rows."""
        if self.axis.frames == 1:
            return self.inputs.idx
        if self.frame_positions is None:
            with self.graph.inserting_after(self.inputs.idx):
                self.frame_positions = self.graph.call_function(frame_positions, (self.inputs.idx, self.axis.frames))
        return self.frame_positions

    def index(self, layout: Layout) -> fx.Node:
        """The rows of `layout` to compute: the selected video rows, every row of the others."""
        if layout.only_video:
            return self.inputs.idx if layout.total == self.axis.num_tokens else self.positions()
        if layout not in self.indices:
            with self.graph.inserting_after(self.inputs.idx):
                self.indices[layout] = self.graph.call_function(segment_rows, (self.inputs.idx, layout.sizes, layout.video))
        return self.indices[layout]

    def rows_index(self, src: fx.Node, index):
        """`src[index]` for the rows form of `src`: a slice of whole segments along the token
        axis becomes the same segments' slice of the rows form."""
        t, ndim = self.axis.tdim[src], len(shape_of(src))
        part = rules.token_index(t, ndim, index)
        if not isinstance(part, slice) or part == slice(None):
            return index
        layout = self.axis.layout_of(src)
        start, stop, _ = part.indices(layout.total)
        bounds = _rows_slice(layout, *layout.segments(start, stop))
        out, dim_in = [], 0
        for i in rules.normalise_index(index, ndim):
            if i is not None and dim_in == t:
                i = bounds
            if i is not None:
                dim_in += 1
            out.append(i)
        return tuple(out)

    def rows_bounds(self, node, t) -> list[slice]:
        layout, bounds, at = self.axis.layout_of(node.args[0]), [], 0
        for piece in node.meta["example_value"]:
            stop = at + int(piece.shape[t])
            bounds.append(_rows_slice(layout, *layout.segments(at, stop)))
            at = stop
        return bounds

    def leave(self, node, user):
        """Point a user after the block at the rows form of `node` (see `_may_leave`)."""
        copy = self.copies[node]
        if user.target is operator.getitem and isinstance(user.args[1], (slice, tuple)) and isinstance(
            self.axis.tdim.get(node), int
        ):
            user.args = (copy, self.rows_index(node, user.args[1]))
        else:
            user.replace_input_with(node, copy)


def _mask_has_rows(node: fx.Node, remap) -> bool:
    """Whether `node` is an attention other than the block's self-attention (a cross-attention)
    whose mask has a row per query, so that its rows form masks the selected rows: it then runs
    as astraea's attention op, which takes any mask. Not as torch's SDPA: on a GPU, SDPA pads a
    mask whose key length is not a multiple of 8 with `constant_pad_nd`, whose fake kernel reads
    every size as a number, which would fix the number of selected rows in the lowered code.
    Deciding makes the mask's rows form (`remap` keeps it for the copy that then reads it)."""
    if node.target not in rules.SDPA or set(node.kwargs) - {"attn_mask", "scale", "enable_gqa"}:
        return False
    mask = sdpa_args(node)[3]
    return isinstance(mask, fx.Node) and remap(mask) is not mask


def _rows_slice(layout: Layout, i: int, j: int) -> slice:
    """The slice of segments [i, j) in the rows form of `layout`, whose video segment has an
    unknown number of rows: bounds counted from the end past the video segment."""
    sizes, video = layout.sizes, layout.video
    if video is None or j <= video:
        return slice(sum(sizes[:i]), sum(sizes[:j]))
    after = sum(sizes[j:])
    stop = -after if after else None
    if i > video:
        return slice(-sum(sizes[i:]), stop)
    return slice(sum(sizes[:i]) or None, stop)


def _splits_tokens(node, t) -> bool:
    dim_position = 1 if node.target in ("unbind", torch.unbind) else 2
    dim = node.kwargs.get("dim", node.args[dim_position] if len(node.args) > dim_position else 0)
    return dim % len(shape_of(node.args[0])) == t


def _broadcast_lead(node: fx.Node, consumer: fx.Node, batch: int) -> int:
    """How many dims broadcasting puts before `node` where `consumer` reads it with tensors of a
    higher rank and a batch: an element-wise op (RoPE tables kept as [N, d] against [B, H, N, d]
    queries, as research code writes them), or SDPA its mask (an [N, N] frame-causal mask); 0
    where it does not, or for a batch of one."""
    broadcasts = rules.rule_for(consumer) is rules.broadcast or (
        consumer.target in rules.SDPA and sdpa_args(consumer)[3] is node)
    shape, out = shape_of(node), shape_of(consumer)
    if batch == 1 or not broadcasts or shape is None or out is None or len(out) <= len(shape) or out[0] != batch:
        return 0
    return len(out) - len(shape)


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


def _segment(layout: Layout, i: int) -> tuple[slice, slice]:
    """The index of segment `i` of a [batch, tokens, channels] tensor of `layout`."""
    start = sum(layout.sizes[:i])
    return slice(None), slice(start, start + layout.sizes[i])


def _unfolded(graph: fx.Graph, lse_rows: fx.Node, q: fx.Node, batch: int, frames: int) -> fx.Node:
    """[B, H, K] from the LSE of an attention whose heads fold the batch in ([1, B * H, K]: heads
    folded into the batch, `[B * H, N, d]`, as diffusers' classic processor and `(b h) n d` layouts
    do; batch-major, as both fold it), so the merge reads each sample's own; or whose batch holds
    the frames of a flat stream ([B * F, H, K / F]: factorised attention's `(b t) s c`), as
    [B, H, K] in the selection's frame-major order."""
    q_shape = shape_of(q)
    if frames > 1 and q_shape is not None and q_shape[0] == batch * frames:
        per_frame = graph.call_method("unflatten", (lse_rows, 0, (batch, frames)))
        return graph.call_method("flatten", (graph.call_method("transpose", (per_frame, 1, 2)), 2))
    if q_shape is None or q_shape[0] != 1 or batch == 1:
        return lse_rows
    flat = graph.call_method("flatten", (lse_rows, 0, 1))
    return graph.call_method("unflatten", (flat, 0, (batch, -1)))


def _batched(shape: tuple) -> tuple:
    """A block input's shape as [batch, tokens, channels]: an unbatched stream ([tokens,
    channels]: one packed sequence, as Cosmos 3 feeds its layers) is a batch of one."""
    return (1, *shape) if len(shape) == 2 else tuple(shape)


def _contiguous(value):
    """The value merge_rows returns for a block whose dense output is `value`: contiguous, whatever
    the dense block's strides (AnyFlow's blocks keep their input's transposed layout). Region keys
    read it: a block fed by another block's merge is not the first block fed by the embeddings."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous():
        return value
    with getattr(value, "fake_mode", None) or torch.no_grad():
        return value.contiguous()
