"""`astraea.explain(model, *args, **kwargs)`: what the compiler would do with a model."""

from __future__ import annotations

import dataclasses

import torch

from .passes import Report, analyse
from .passes.report import GraphOutcome


def explain(model: torch.nn.Module, *args, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` with dynamo and return the analysis report.

    The report says which blocks will be sparse and, for each one that stays dense, why.
    When dynamo splits the call into several graphs (graph breaks), every graph is analysed on
    its own: the report is that of the graph with the most blocks, and it lists each graph's
    outcome and where dynamo broke the model, so that a user can remove a break that keeps
    the blocks apart.
    """
    with torch.no_grad():
        traced = torch._dynamo.explain(model)(*args, **kwargs)
    return summarise([analyse(gm) for gm in traced.graphs], traced.break_reasons)


def summarise(reports: list[Report], break_reasons: list) -> Report:
    """One report for a call dynamo compiled as several graphs: `reports` has one per graph, in
    the order dynamo compiled them, and `break_reasons` are dynamo's reasons for the breaks
    (`torch._dynamo.backends.debugging.ExplainWithBackend` collects both around any backend,
    astraea's included: one trace serves a compile and its explanation)."""
    if not reports:
        raise RuntimeError(
            "astraea.explain: dynamo compiled no graph for this call; its recompile limit for this "
            "forward may be reached (torch._dynamo.reset() clears it)"
        )
    best = max(reports, key=lambda r: (r.num_blocks, r.num_sparse_blocks))
    if len(reports) == 1:
        return best
    graphs = tuple(
        GraphOutcome(r.num_sparse_blocks, r.num_blocks, r.reason or next((b.reason for b in r.blocks if not b.sparse), None))
        for r in reports
    )
    breaks = tuple(dict.fromkeys(_graph_break(b) for b in break_reasons))
    return dataclasses.replace(best, graphs=graphs, graph_breaks=breaks)


# Breaks a dynamo flag removes, by the start of dynamo's reason, and the flag as a user sets it
# (with it, Mochi's per-sample `nonzero` of the text mask stays in the graph and its blocks go sparse).
FLAG_FOR_BREAK = {
    "Dynamic shape operator": "torch._dynamo.config.capture_dynamic_output_shape_ops = True",
    "Data dependent operator": "torch._dynamo.config.capture_scalar_outputs = True",
}


def _graph_break(reason) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} " if frame else ""
    text = " ".join(str(reason.reason).split())
    flag = next((f for start, f in FLAG_FOR_BREAK.items() if text.startswith(start)), None)
    hint = f"{flag} keeps it in the graph: " if flag else ""
    return f"{where}({hint}{text[:160]})"
