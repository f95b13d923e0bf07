"""The inputs a rewritten graph takes besides the model's own, and how to read its ops'
arguments by name. For each sparse block the rewrite (passes/rewrite.py) appends the fields
of `BlockInputs`, in order; the lowering fakes them, the runner feeds them
(runtime/state.py), and the skip pass reads `merge_rows`' arguments by their schema names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx


class BlockInputs(NamedTuple):
    """One sparse block's inputs of the rewritten graph, in the order it takes them (graph
    nodes in the rewrite, tensors in the runner)."""

    idx: Any  # [S, K] the selected rows
    cache: Any  # [B, N, D] what the block last added to each token
    change: Any  # [S, N] how far each token's contribution moved
    lse: Any  # [S, N] each token's attention log-sum-exp


# Beyond every block's BlockInputs, the forms of the graph that use the forecasts' slopes
# (runtime/forecast.py) take, block after block: the skip graph's forecasting form
# (passes/skip.py), the block's slope [B, N, D] and staleness [S, N]; the sparse graph's forms
# that keep the slopes (passes/slopes.py), those and the span [S, K], the steps since each
# selected row was last computed.
SKIP_SLOPE_INPUTS = ("slope", "stale")
MERGE_SLOPE_INPUTS = ("slope", "stale", "span")
NO_SLOPES = (None,) * len(MERGE_SLOPE_INPUTS)  # a merge's slope inputs in the copying graph


def call_arg(node: fx.Node, name: str):
    """The argument `name` of a call to a registered op, however it was passed."""
    if name in node.kwargs:
        return node.kwargs[name]
    op = node.target if isinstance(node.target, torch._ops.OpOverload) else node.target.default
    names = [a.name for a in op._schema.arguments]
    return node.args[names.index(name)]


def set_call_args(node: fx.Node, **values) -> None:
    """Set arguments of a call to a registered op by name, where they were passed positionally or
    by keyword; an argument not passed yet is passed by keyword."""
    op = node.target if isinstance(node.target, torch._ops.OpOverload) else node.target.default
    names = [a.name for a in op._schema.arguments]
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        at = names.index(name)
        if at < len(args):
            args[at] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


@dataclass(frozen=True)
class SparseBlockInputs:
    """Where a sparse block's runtime inputs sit in the rewritten graph's signature."""

    index: int
    module: str
    shape: tuple[int, ...]  # block input [B, N, D]
    dtype: torch.dtype
    shared_because: str | None = None  # why one selection serves the batch, if it does

    @property
    def samples(self) -> int:
        """S, the rows of idx and of the scores: B (a selection per sample) or 1 (one for the batch)."""
        return 1 if self.shared_because else self.shape[0]
