"""Budgets are data: changing them from step to step does not recompile."""

import torch

import astraea
from tests.models import sample, wan


def test_changing_budgets_do_not_recompile():
    torch._dynamo.reset()
    family = wan()
    schedule = [1.0, 0.0, 0.3, 0.7, 0.1, 1.0, 0.5, 0.0, 0.9, 0.2]
    be = astraea.backend(schedule=schedule)
    compiled = torch.compile(family.model, backend=be)
    first = sample(family, compiled, steps=len(schedule))
    assert len(be.runners) == 1  # one compilation served every budget
    with torch.compiler.set_stance("fail_on_recompile"):
        second = sample(family, compiled, steps=len(schedule))
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # a new generation starts afresh
    budgets = [r.budget for r in be.runners[0].records if r.context == 0]
    assert budgets == [1.0] + schedule[1:] + [1.0] + schedule[1:]
    assert [r.tokens for r in be.runners[0].records if r.budget == 0.0] == [0] * 8
