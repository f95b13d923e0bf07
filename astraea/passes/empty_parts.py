"""Concatenations drop their empty parts, so an empty slice of the tokens reads as nothing.

Research code joins a processed prefix of the tokens back to the rest by slicing: the original
Wan applies RoPE to each sample's first `seq_len` tokens and writes
`torch.cat([rotated, x[i, seq_len:]])`, where `seq_len` is every token (the tail is for padding
it never has). That tail is a slice of the token axis with no rows, which the token rules cannot
place (indexing along the token axis), and the block ran dense. A concatenation computes the same
without its empty parts, unless one of them widens the result's dtype (then it stays as written).
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx

from .graph_edits import edit_each
from .rules import dtype_of, shape_of

CONCATENATIONS = {torch.cat, torch.concat, torch.concatenate}


def drop_empty_parts(gm: fx.GraphModule) -> int:
    """Drop the empty parts of every concatenation in `gm`; returns how many concatenations changed."""
    return edit_each(gm, lambda n: n.op == "call_function" and n.target in CONCATENATIONS, _drop)


def _drop(graph: fx.Graph, node: fx.Node) -> int:
    parts, out = node.args[0], dtype_of(node)
    if not isinstance(parts, (list, tuple)) or out is None:
        return 0
    dtypes = [dtype_of(p) for p in parts]
    if None in dtypes:
        return 0
    empty = [0 in (shape_of(p) or (1,)) for p in parts]  # sizes known only at run time: not empty
    kept = [p for p, e in zip(parts, empty) if not e]
    if len(kept) == len(parts) or not kept:
        return 0
    if functools.reduce(torch.promote_types, (d for d, e in zip(dtypes, empty) if not e)) != out:
        return 0  # an empty part of a wider dtype promotes the result
    node.args = (type(parts)(kept), *node.args[1:])
    for part in set(parts) - set(kept):
        if not part.users:
            graph.erase_node(part)
    return 1
