"""New graph nodes with the example values dynamo gives its own (`meta["example_value"]`), which
the analysis reads shapes from: the normalising passes build nodes with it."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten


def fake_mode_of(values):
    """The one fake mode the fake tensors among `values` belong to (dynamo's: a backend may run
    under another), or None where there is none or more than one."""
    modes = {id(v.fake_mode): v.fake_mode for v in values if isinstance(v, FakeTensor)}
    return next(iter(modes.values())) if len(modes) == 1 else None


def node_with_value(graph: fx.Graph, op: str, target, args, kwargs, meta: dict) -> fx.Node:
    """A node of `op` and `target` at the graph's insertion point, its value computed on the fake
    values of its inputs; `meta` (a node's, for its module path) with that value, or without one
    where an input has none (a node an earlier pass added)."""
    node = graph.create_node(op, target, args, kwargs)
    node.meta = {k: v for k, v in meta.items() if k != "example_value"}
    if any(isinstance(a, fx.Node) and a.meta.get("example_value") is None for a in tree_flatten((args, kwargs))[0]):
        return node
    values = fx.node.map_arg((args, kwargs), lambda a: a.meta["example_value"])
    call = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)) if op == "call_method" else target
    with fake_mode_of(tree_flatten(values)[0]) or torch.no_grad():
        node.meta["example_value"] = call(*values[0], **values[1])
    return node
