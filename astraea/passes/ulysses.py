"""Collapse traced Ulysses attention into one op, so the analysis sees a plain self-attention.

Under diffusers' context parallelism, dynamo traces each attention as: the local query, key
and value [B, n, H, d] (n = N / P tokens of this rank) reshaped and permuted, exchanged by
`_c10d_functional.all_to_all_single` for all N tokens of H / P heads, attended with SDPA,
and exchanged back to [B, n, H, d]. This pass finds that pattern by shape (it walks from the
SDPA through layout ops and collectives until it meets a tensor shaped like the local
query) and replaces it with `astraea::ulysses_attention` on [B, H, n, d], so the token
analysis, the rewrite and the runner work on this rank's tokens as they do on one GPU.
Collective patterns it does not recognise stay in the graph; the analysis then reports the
blocks around them dense, naming the collective.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..ops import ulysses  # noqa: F401  (registers torch.ops.astraea.ulysses_*)
from .rules import LAYOUT_METHODS
from .token_axis import SDPA, sdpa_args, shape_of

_c10d = torch.ops._c10d_functional
COLLECTIVES = {_c10d.all_to_all_single, _c10d.wait_tensor}  # overload packets, as dynamo records them
ALL_TO_ALL = _c10d.all_to_all_single


def _is_layout(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in LAYOUT_METHODS) or (
        node.op == "call_function" and _packet(node) in COLLECTIVES
    )


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", node.target)


def _local_input(arg: fx.Node, local_shape: tuple) -> tuple[fx.Node | None, str | None]:
    """Walk back from an SDPA input to the local [B, n, H, d] tensor; also the group's name."""
    node, group = arg, None
    while isinstance(node, fx.Node) and _is_layout(node):
        if _packet(node) is ALL_TO_ALL:
            group = node.args[3]
        elif group is not None and shape_of(node) == local_shape:
            return node, group
        node = node.args[0]
    if group is not None and shape_of(node) == local_shape:
        return node, group
    return None, None


def _local_output(sdpa: fx.Node, local_shape: tuple) -> fx.Node | None:
    """Walk forward from the SDPA through single-user layout ops past the exchange back."""
    node, exchanged = sdpa, False
    while len(node.users) == 1:
        node = next(iter(node.users))
        if not _is_layout(node):
            return None
        exchanged = exchanged or _packet(node) is ALL_TO_ALL
        if exchanged and shape_of(node) == local_shape:
            return node
    return None


def collapse_ulysses_attention(gm: fx.GraphModule) -> int:
    """Replace every recognised Ulysses attention; returns the ranks it spans (1: none found)."""
    graph, replaced, ranks = gm.graph, 0, 1
    for sdpa in [n for n in graph.nodes if n.op == "call_function" and n.target in SDPA]:
        q, k, v, mask = sdpa_args(sdpa)
        shape = shape_of(sdpa)
        if mask is not None or shape is None or len(shape) != 4:
            continue
        b, heads_local, n_all, d = shape
        size = _group_size(q)
        if size is None or n_all % size:
            continue
        local_shape = (b, n_all // size, heads_local * size, d)
        found = [_local_input(a, local_shape) for a in (q, k, v)]
        out = _local_output(sdpa, local_shape)
        groups = {g for _, g in found}
        if out is None or any(x is None for x, _ in found) or len(groups) != 1:
            continue
        with graph.inserting_before(out):
            heads_first = [_transpose(graph, x) for x, _ in found]
            att = graph.call_function(
                torch.ops.astraea.ulysses_attention, tuple(heads_first), {"scale": sdpa.kwargs.get("scale"), "group": groups.pop()}
            )
            att.meta["example_value"] = heads_first[0].meta["example_value"]  # same shape and dtype
            local = _transpose(graph, att)
        out.replace_all_uses_with(local)
        _erase_dead(graph, out)
        replaced, ranks = replaced + 1, size
    if replaced:
        graph.lint()
        gm.recompile()
    return ranks


def _group_size(q: fx.Node) -> int | None:
    """Ranks of the exchange feeding the query: the number of splits of its all-to-all."""
    node = q
    while isinstance(node, fx.Node) and _is_layout(node):
        if _packet(node) is ALL_TO_ALL:
            return len(node.args[1])
        node = node.args[0]
    return None


def _transpose(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """x.transpose(1, 2), with the example value the analysis reads shapes from."""
    t = graph.call_method("transpose", (x, 1, 2))
    t.meta["example_value"] = x.meta["example_value"].transpose(1, 2)
    return t


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and, transitively, the inputs nothing else uses any more."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op != "call_function" and n.op != "call_method":
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)
