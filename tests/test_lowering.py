"""The Inductor lowering (used on GPU) gives the eager rewrite's results, with K symbolic."""

import pytest
import torch

import astraea
from tests.models import sample, wan


@pytest.mark.parametrize("batch", [1, 2])  # one selection, or one per sample
def test_inductor_lowering_matches_eager_and_serves_every_budget(batch):
    torch._dynamo.reset()
    family = wan(batch=batch)
    schedule = [1.0, 0.5, 0.3, 0.7, 0.0, 1.0]
    inductor = astraea.backend(schedule=schedule, lowering="inductor")
    compiled = torch.compile(family.model, backend=inductor)
    out = sample(family, compiled, steps=len(schedule))
    with torch.compiler.set_stance("fail_on_recompile"):
        again = sample(family, compiled, steps=len(schedule))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    eager = astraea.backend(schedule=schedule, lowering="eager")
    reference = sample(family, torch.compile(family.model, backend=eager), steps=len(schedule))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(inductor.runners) == 1
    assert not isinstance(inductor.runners[0].graph_fn, torch.fx.GraphModule)  # really lowered
    assert {b.samples for b in inductor.runners[0].blocks} == {batch}
