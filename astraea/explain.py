"""`astraea.explain(model, *args, **kwargs)`: what the compiler would do with a model."""

from __future__ import annotations

import torch

from .passes import Report, analyse


def explain(model: torch.nn.Module, *args, **kwargs) -> Report:
    """Trace `model(*args, **kwargs)` with dynamo and return the analysis report.

    The report says which blocks will be sparse and, for each one that stays dense, why.
    When dynamo splits the model into several graphs, the report of the graph with the most
    blocks is returned (the others hold no transformer blocks in any model seen so far).
    """
    reports: list[Report] = []

    def capture(gm, example_inputs):
        reports.append(analyse(gm))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(*args, **kwargs)
    if not reports:
        raise RuntimeError(
            "astraea.explain: dynamo compiled no graph for this call; its recompile limit for this "
            "forward may be reached (torch._dynamo.reset() clears it)"
        )
    return max(reports, key=lambda r: (r.num_blocks, r.num_sparse_blocks))
