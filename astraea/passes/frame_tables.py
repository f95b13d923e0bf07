"""Per-frame modulation written on frames: give its tables a row per token, so the analysis can follow it.

Models that denoise each frame at its own noise level (diffusion forcing, autoregressive video:
SANA-WM, and research code such as CausVid's and Self-Forcing's causal Wan) modulate the tokens of
each frame with that frame's table, writing it by splitting the token axis into frames:

    h = (norm(x).unflatten(1, (F, P)) * (1 + scale) + shift).flatten(1, 2)   # scale, shift [B, F, 1, C]

To the token rules the split is a reshape that splits the token axis, and the block runs dense.
This pass finds each such run (a split of one dim into (F, P), element-wise ops whose other operands
have one row per frame or per sample or are split the same way (Open-Sora 1.2 picks each frame's
modulation from two streams: `torch.where(first_frame[:, :, None, None], h0_framed, h_framed)`),
and the merge back to the split's input shape) and rewrites it
on the unsplit tensor, each table expanded to a row per token (`table.expand(..., F, P, C).flatten`):
the same values, now a per-token table the rewrite gathers with the selected rows, as it does Wan
2.2's per-token timesteps. A run with any other use of a split value is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .fake_values import node_with_value
from .graph_edits import edit_each
from .rules import DTYPE_FROM_SECOND, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, RESHAPE_METHODS, shape_of

# Reshapes (a split when the rank grows by one, a merge when the split's input shape comes back)
# and element-wise ops: the token rules' own lists.
RESHAPES = {("call_method", m) for m in RESHAPE_METHODS} | {
    ("call_function", f) for f in (torch.reshape, torch.flatten, torch.unflatten)}
ELEMENTWISE = {("call_function", f) for f in ELEMENTWISE_FUNCTIONS} | {
    ("call_method", m) for m in (*ELEMENTWISE_METHODS, *DTYPE_FROM_SECOND)}


def unsplit_frame_tables(gm: fx.GraphModule) -> int:
    """Rewrite each per-frame run in `gm` on the unsplit tokens; returns how many."""
    return edit_each(gm, lambda n: _split_dim(n) is not None, _unsplit)


def _key(node: fx.Node):
    return node.op, node.target


def _split_dim(node: fx.Node) -> int | None:
    """d where `node` reshapes [..., N, ...] into [..., F, P, ...] (F, P > 1) at dim d >= 1."""
    if node.op not in ("call_method", "call_function") or _key(node) not in RESHAPES or not node.args:
        return None
    ins, outs = shape_of(node.args[0]), shape_of(node)
    if ins is None or outs is None or len(outs) != len(ins) + 1:
        return None
    for d in range(1, len(ins)):
        if ins[:d] == outs[:d] and ins[d + 1:] == outs[d + 2:] and ins[d] == outs[d] * outs[d + 1] \
                and outs[d] > 1 and outs[d + 1] > 1:
            return d
    return None


def _unsplit(graph: fx.Graph, split: fx.Node) -> int:
    d, whole, parts = _split_dim(split), shape_of(split.args[0]), shape_of(split)
    splits, run, merges, frontier = [split], [split], [], [split]

    def joins(a: fx.Node) -> bool:
        """Whether `a` can be an operand of the run: in it, a table per frame, or (joining it with
        what it reads) another tensor split the same way or an element-wise op of such."""
        if a in run or _per_frame(a, parts, d):
            return True
        if _split_dim(a) == d and shape_of(a) == parts:
            splits.append(a)
        elif not (_key(a) in ELEMENTWISE and shape_of(a) == parts and all(map(joins, a.all_input_nodes))):
            return False
        run.append(a)
        frontier.append(a)
        return True

    while frontier:
        for user in list(frontier.pop().users):
            if user in run or user in merges:
                continue
            if _key(user) in RESHAPES and shape_of(user) == whole and user.args[0] in run:
                merges.append(user)
            elif not joins(user):
                return 0  # a split value read otherwise: the run stays as written
    if not merges:
        return 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    run.sort(key=order.get)
    unsplit = {s: s.args[0] for s in splits}
    for node in run:
        if node in unsplit:
            continue
        with graph.inserting_before(node):
            args = fx.node.map_arg(node.args, lambda a: unsplit.get(a) or _per_token(graph, a, parts, d, node.meta))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: unsplit.get(a) or _per_token(graph, a, parts, d, node.meta))
            unsplit[node] = node_with_value(graph, node.op, node.target, args, kwargs, node.meta)
    for merge in merges:
        merge.replace_all_uses_with(unsplit[merge.args[0]])
    for node in merges + run[::-1]:
        graph.erase_node(node)
    return 1


def _per_frame(a: fx.Node, parts: tuple, d: int) -> bool:
    """A tensor broadcast over the split shape with one row per frame (or one for all), per sample."""
    shape = shape_of(a)
    if shape is None or len(shape) > len(parts):
        return False
    shape = (1,) * (len(parts) - len(shape)) + shape
    return shape[d + 1] == 1 and all(s in (1, p) for s, p in zip(shape, parts))


def _per_token(graph: fx.Graph, a, parts: tuple, d: int, meta: dict):
    """The per-frame tensor `a` with a row per token: [..., F, 1, ...] -> [..., F * P, ...], in the
    module of its consumer (`meta`), where the analysis places it."""
    if not isinstance(a, fx.Node):
        return a
    shape = shape_of(a)
    lead = len(parts) - len(shape)
    if lead:
        a = node_with_value(graph, "call_method", "reshape", (a, (1,) * lead + shape), {}, meta)
        shape = (1,) * lead + shape
    if shape[d] == 1:  # one row for every frame: it broadcasts over the tokens as it is
        return node_with_value(graph, "call_method", "flatten", (a, d, d + 1), {}, meta)
    sizes = [-1] * len(shape)
    sizes[d + 1] = parts[d + 1]
    expanded = node_with_value(graph, "call_method", "expand", (a, *sizes), {}, meta)
    return node_with_value(graph, "call_method", "flatten", (expanded, d, d + 1), {}, meta)
