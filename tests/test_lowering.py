"""The Inductor lowering (used on GPU) gives the eager rewrite's results, with K symbolic."""

import pytest
import torch

import astraea
from tests.models import sample, wan


@pytest.mark.parametrize("batch, regional", [(1, True), (2, True), (1, False)])  # one selection, or one per sample
def test_inductor_lowering_matches_eager_and_serves_every_budget(batch, regional):
    torch._dynamo.reset()
    family = wan(batch=batch, layers=3)
    schedule = [1.0, 0.5, 0.3, 0.7, 0.0, 1.0]
    inductor = astraea.backend(schedule=schedule, lowering="inductor", regional=regional)
    compiled = torch.compile(family.model, backend=inductor)
    out = sample(family, compiled, steps=len(schedule))
    with torch.compiler.set_stance("fail_on_recompile"):
        again = sample(family, compiled, steps=len(schedule))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    eager = astraea.backend(schedule=schedule, lowering="eager")
    reference = sample(family, torch.compile(family.model, backend=eager), steps=len(schedule))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(inductor.runners) == 1
    graph = inductor.runners[0].graph_fn
    if regional:  # the embeddings, one block for all three, the output head: each lowered once
        assert (graph.num_regions, graph.num_lowered) == (5, 3)
        graph = graph.steps[1][0]
        assert all(step[0] is graph for step in inductor.runners[0].graph_fn.steps[1:4])
    assert not isinstance(graph, torch.fx.GraphModule)  # really lowered
    assert {b.samples for b in inductor.runners[0].blocks} == {batch}
