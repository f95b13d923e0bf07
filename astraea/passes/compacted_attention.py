"""Attention over the valid rows of a padded segment, gathered by `nonzero`, as masked attention.

Mochi (and research code written like it) attends over the video and only the valid text
tokens of each sample: it gathers the rows its text mask marks, with an index whose length
is known only at run time, joins them to the video, attends, and pads the result back to the
joint length with zeros:

    idx   = torch.nonzero(mask).flatten()      # u valid rows, u known at run time
    q     = torch.cat([q_video, q_text[..., idx, :]], dim=-2)   # and k, v alike
    out   = F.scaled_dot_product_attention(q, k, v)
    out   = F.pad(out, (0, 0, 0, n_video + n_text - (n_video + u)))

With dynamo capturing data-dependent shapes (`torch._dynamo.config.
capture_dynamic_output_shape_ops = True`; otherwise `nonzero` splits the graph in every
block), the graph holds that pattern, and its sizes known only at run time defeat the token
analysis. This pass writes it with static shapes, computing the same function: the text rows
in the same order, valid ones first (a stable sort of the mask, not `nonzero`), every row
gathered; the invalid rows masked out of the keys; the rows the padding held set to zero.

    order = torch.argsort(~valid, stable=True); keep = valid[order]
    q     = torch.cat([q_video, q_text[..., order, :]], dim=-2)
    out   = F.scaled_dot_product_attention(q, k, v, attn_mask=[video keys, keep])
    out   = torch.where([video rows, keep], out, 0)

The attention then reads as joint attention over a text segment of fixed length, which the
analysis follows. It costs attention over the padding's keys too: text is short next to a
video's tokens. Anything else the index or its length feeds leaves the pattern as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fake_values import node_with_value
from .rules import PAD, SDPA, pad_arguments, sdpa_args, shape_of

INDEX_SHAPING = {"flatten", "squeeze", "view", "reshape", torch.flatten, torch.squeeze}


def expand_compacted_attention(gm: fx.GraphModule) -> int:
    """Rewrite each attention over `nonzero`-gathered rows in `gm`; returns how many."""
    found = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.nonzero and not node.kwargs.get("as_tuple", False):
            match = _match(node)
            if match is not None:
                _rewrite(gm.graph, node, *match)
                found += 1
    if found:
        gm.graph.lint()
        gm.recompile()
    return found


def _match(nonzero: fx.Node):
    """(mask, indices, gathers, joins, pads) of the pattern around `nonzero`, or None.

    indices: `nonzero` flattened; gathers: the `x[..., idx, ...]` nodes, each the last part of a
    concatenation (joins: concatenation -> its gathered part) along the dim it indexes, the
    concatenations feeding SDPAs as keys and values; pads: per SDPA, the padding of its output
    back to the joint length (None where its queries hold no gathered rows)."""
    mask = nonzero.args[0]
    mask_shape = shape_of(mask)
    if mask_shape is None or len(mask_shape) != 1:
        return None
    indices = [u for u in nonzero.users if u.op in ("call_method", "call_function") and u.target in INDEX_SHAPING]
    gathers = [g for i in indices for g in i.users]
    if not indices or not all(_index_node(g) is i and _gathered_dim(g, i) is not None
                              for i in indices for g in i.users):
        return None
    joins = {}
    for g in gathers:
        users = list(g.users)
        if len(users) != 1 or not _joins_last(users[0], g, _gathered_dim(g, _index_node(g))):
            return None
        joins[users[0]] = g
    attentions = {u for c in joins for u in c.users}
    if not all(u.op == "call_function" and u.target in SDPA for u in attentions):
        return None
    pads = {}
    for a in attentions:
        q, k, v, mask_arg = sdpa_args(a)
        if mask_arg is not None or a.kwargs.get("is_causal") or a.kwargs.get("dropout_p", 0.0) or len(a.args) > 3:
            return None
        if k not in joins or v not in joins or any(c.users.keys() != {a} for c in (q, k, v) if c in joins):
            return None
        pads[a] = None
        if q in joins:
            users = list(a.users)
            if len(users) != 1 or not _pads_back(users[0], a, q):
                return None
            pads[a] = users[0]
    if set(joins) != {x for a in attentions for x in sdpa_args(a)[:3] if x in joins}:
        return None  # a gathered concatenation used outside an attention
    kept = set(indices) | set(gathers) | set(joins) | set(attentions) | {p for p in pads.values() if p is not None}
    if not _only_sizes_beyond(nonzero, kept):
        return None
    return mask, indices, gathers, joins, pads


def _index_node(getitem: fx.Node) -> fx.Node | None:
    if getitem.op != "call_function" or getitem.target is not operator.getitem:
        return None
    index = getitem.args[1]
    index = index if isinstance(index, tuple) else (index,)
    nodes = [i for i in index if isinstance(i, fx.Node)]
    return nodes[0] if len(nodes) == 1 else None


def _gathered_dim(getitem: fx.Node, index_node) -> int | None:
    """The dim `getitem` gathers with `index_node`, its other entries whole-dim or plain slices."""
    if getitem.op != "call_function" or getitem.target is not operator.getitem or index_node is None:
        return None
    index = getitem.args[1] if isinstance(getitem.args[1], tuple) else (getitem.args[1],)
    if any(i is Ellipsis or i is None for i in index) or sum(i is index_node for i in index) != 1:
        return None
    if not all(i is index_node or isinstance(i, slice) for i in index):
        return None
    return index.index(index_node)


def _joins_last(cat: fx.Node, part: fx.Node, dim: int | None) -> bool:
    if dim is None or cat.op != "call_function" or cat.target is not torch.cat:
        return False
    parts = cat.args[0]
    cat_dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    shape = shape_of(parts[0]) if isinstance(parts[0], fx.Node) else None
    return shape is not None and parts[-1] is part and part not in parts[:-1] \
        and cat_dim % len(shape) == dim and len(shape) >= 2 and dim == len(shape) - 2


def _pads_back(pad: fx.Node, attention: fx.Node, q: fx.Node) -> bool:
    """`pad` pads the attention's rows at their end, with zeros, to the joint length with
    every gathered row: the static length of the query parts before them plus the whole
    tensor they were gathered from."""
    if pad.op != "call_function" or pad.target not in PAD or pad.args[0] is not attention:
        return False
    widths, mode, value = pad_arguments(pad)
    if not isinstance(widths, (list, tuple)) or len(widths) != 4 or mode != "constant" or value not in (None, 0, 0.0):
        return False
    if not all(isinstance(w, int) and w == 0 for w in widths[:3]):  # only the rows' end is padded
        return False
    shape = shape_of(pad)
    return shape is not None and shape[-2] == _joint_length(q)


def _joint_length(cat: fx.Node) -> int | None:
    """The length of a gathered concatenation along its dim with every row of the gathered part."""
    *before, gathered = cat.args[0]
    source = gathered.args[0]
    shapes = [shape_of(p) for p in before] + [shape_of(source)]
    if any(s is None for s in shapes):
        return None
    return sum(s[-2] for s in shapes)


def _only_sizes_beyond(nonzero: fx.Node, kept: set) -> bool:
    """Whether every node that depends on `nonzero` other than through the pattern's own nodes
    computes sizes or checks them (no tensors), and feeds nothing but the pads' widths."""
    stack, seen = list(nonzero.users), set()
    while stack:
        n = stack.pop()
        if n in seen or n in kept:
            continue
        seen.add(n)
        if isinstance(n.meta.get("example_value"), torch.Tensor) or n.op == "output":
            return False
        stack.extend(n.users)
    return True


def _rewrite(graph: fx.Graph, nonzero, mask, indices, gathers, joins, pads) -> None:
    meta = nonzero.meta
    with graph.inserting_before(nonzero):
        valid = node_with_value(graph, "call_function", torch.ne, (mask, 0), {}, meta)
        invalid = node_with_value(graph, "call_method", "int", (node_with_value(graph, "call_function", torch.eq,
                                                                                  (mask, 0), {}, meta),), {}, meta)
        order = node_with_value(graph, "call_function", torch.argsort, (invalid,), {"stable": True}, meta)
        keep = node_with_value(graph, "call_function", operator.getitem, (valid, order), {}, meta)
    for g in gathers:
        index_node = _index_node(g)
        index = g.args[1] if isinstance(g.args[1], tuple) else (g.args[1],)
        g.args = (g.args[0], tuple(order if i is index_node else i for i in index))
        _revalue(g)
    for cat in joins:
        _revalue(cat)
    for attention, pad in pads.items():
        q, k, _, _ = sdpa_args(attention)
        with graph.inserting_before(attention):
            key_mask = _rows_kept(graph, k, keep, meta)
            shape = (1,) * (len(shape_of(k)) - 1) + (shape_of(k)[-2],)
            key_mask = node_with_value(graph, "call_method", "view", (key_mask, *shape), {}, attention.meta)
        attention.kwargs = {**attention.kwargs, "attn_mask": key_mask}
        _revalue(attention)
        if pad is None:
            continue
        with graph.inserting_before(pad):
            rows = _rows_kept(graph, q, keep, meta)
            rows = node_with_value(graph, "call_method", "unsqueeze", (rows, -1), {}, pad.meta)
            zeroed = node_with_value(graph, "call_function", torch.where, (rows, attention, 0.0), {}, pad.meta)
        pad.replace_all_uses_with(zeroed)
        graph.erase_node(pad)
    for index in indices:
        graph.erase_node(index)
    _erase_with_users(graph, nonzero)


def _rows_kept(graph: fx.Graph, cat: fx.Node, keep: fx.Node, meta: dict) -> fx.Node:
    """[rows of the concatenation]: True for its parts before the gathered one, `keep` after."""
    before = sum(shape_of(p)[-2] for p in cat.args[0][:-1])
    ones = node_with_value(graph, "call_method", "new_ones", (keep, (before,)), {}, meta)
    return node_with_value(graph, "call_function", torch.cat, ([ones, keep],), {}, meta)


def _revalue(node: fx.Node) -> None:
    """Recompute a changed node's example value from its inputs'."""
    graph = node.graph
    with graph.inserting_before(node):
        fresh = node_with_value(graph, node.op, node.target, node.args, node.kwargs, node.meta)
    node.meta = fresh.meta
    graph.erase_node(fresh)


def _erase_with_users(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and everything that depends on it (size checks and sums), last first."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    doomed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in doomed:
            doomed.add(n)
            stack.extend(n.users)
    for n in sorted(doomed, key=order.get, reverse=True):
        graph.erase_node(n)
