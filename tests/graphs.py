"""The graph dynamo hands a backend, for tests of the passes that normalise it."""

from __future__ import annotations

import torch
import torch.fx as fx


def graph_of(fn, *args) -> fx.GraphModule:
    """The one graph dynamo traces for `fn(*args)`, as a backend receives it (no grad)."""
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=keep, fullgraph=True)(*args)
    return graphs[0]
