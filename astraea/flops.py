"""FLOP counts of dense and sparse forwards, with our attention op and CPU flash attention counted."""

from __future__ import annotations

from typing import Callable

from torch.utils.flop_counter import FlopCounterMode

from .ops import sparse, ulysses


def count_flops(fn: Callable, *args):
    """(FLOPs, result) of `fn(*args)`."""
    counter = FlopCounterMode(display=False, custom_mapping={**sparse.flop_formulas(), **ulysses.flop_formulas()})
    with counter:
        out = fn(*args)
    return counter.get_total_flops(), out


def counting(graph: Callable, sink: list) -> Callable:
    """Stand-in for a runner's `graph_fn` that appends each call's FLOPs to `sink`.

    Counting inside the runner matters: FlopCounterMode around a compiled module call installs
    module hooks, which make dynamo recompile.
    """

    def run(*args):
        flops, out = count_flops(graph, *args)
        sink.append(flops)
        return out

    return run
