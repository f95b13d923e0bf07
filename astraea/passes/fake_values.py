"""New graph nodes with the example values dynamo gives its own (`meta["example_value"]`), which
the analysis reads shapes from: the normalising passes build nodes with it."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_flatten


def node_with_value(graph: fx.Graph, op: str, target, args, kwargs, meta: dict) -> fx.Node:
    """A node of `op` and `target` at the graph's insertion point, its value computed on the fake
    values of its inputs; `meta` (a node's, for its module path) with that value."""
    node = graph.create_node(op, target, args, kwargs)
    values = fx.node.map_arg((args, kwargs), lambda a: a.meta["example_value"])
    fakes = [v for v in tree_flatten(values)[0] if isinstance(v, FakeTensor)]
    call = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)) if op == "call_method" else target
    with fakes[0].fake_mode if fakes else torch.no_grad():
        value = call(*values[0], **values[1])
    node.meta = {**meta, "example_value": value}
    return node
