"""What the normalising passes share: edit each node of a graph that matches, then check and
recompile the graph once, if anything changed."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx


def edit_each(gm: fx.GraphModule, matches: Callable[[fx.Node], bool], edit: Callable[[fx.Graph, fx.Node], int]) -> int:
    """`edit(graph, node)` (1 where it rewrote, else 0) for each node of `gm` that `matches`, in
    the order the graph had before the first edit; returns how many were rewritten. A node an
    earlier edit erased has neither users nor inputs left, so it matches nothing."""
    done = sum(edit(gm.graph, node) for node in list(gm.graph.nodes) if matches(node))
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
