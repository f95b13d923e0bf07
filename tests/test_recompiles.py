"""Budgets are data: changing them from step to step does not recompile."""

import pytest
import torch

import astraea
from astraea import ConfigError
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
    budgets = [r.budget for r in be.runners[0].records if r.branch == 0]
    assert budgets == [1.0] + schedule[1:] + [1.0] + schedule[1:]
    assert [r.tokens for r in be.runners[0].records if r.budget == 0.0] == [0] * 8


def test_update_changes_selection_without_recompiling():
    """One compilation serves every run-time option: after `update`, a generation equals one
    from a backend compiled with those options, and nothing recompiles."""
    options = dict(schedule=[1.0, 0.5, 0.25, 0.5, 0.0, 0.5], policy="random", weight_penalty=0.0, full_steps=2, seed=3)
    torch._dynamo.reset()
    family = wan()
    fresh = astraea.backend(**options)
    expected = sample(family, torch.compile(family.model, backend=fresh), steps=6)
    torch._dynamo.reset()
    be = astraea.backend(schedule=0.5)
    compiled = torch.compile(family.model, backend=be)
    default = sample(family, compiled, steps=6)
    be.update(**options)
    with torch.compiler.set_stance("fail_on_recompile"):
        updated = sample(family, compiled, steps=6)
    assert len(be.runners) == 1
    torch.testing.assert_close(updated, expected, rtol=0, atol=0)
    assert not torch.equal(updated, default)  # the options did change what ran
    assert [r.tokens for r in be.runners[0].records[-12:]] == [r.tokens for r in fresh.runners[0].records]


def test_update_refuses_compiled_options_and_unknown_ones_without_change():
    torch._dynamo.reset()
    family = wan()
    be = astraea.backend(schedule=0.5)
    sample(family, torch.compile(family.model, backend=be), steps=2)
    before = be.config
    with pytest.raises(ConfigError, match="cache_dtype.*compiled into the graph"):
        be.update(cache_dtype="float16", policy="delta")
    with pytest.raises(ConfigError, match="regional.*compiled into the graph"):
        be.update(regional=False)
    with pytest.raises(ConfigError, match="'regional' must be True or False"):
        astraea.backend(regional="yes")
    with pytest.raises(ConfigError, match="unknown astraea option"):
        be.update(budget=0.5)
    with pytest.raises(ConfigError, match="budget"):
        be.update(schedule=1.5)
    assert be.config is before and be.runners[0].config is before


def test_call_records_are_bounded(monkeypatch):
    """A runner serving many generations keeps only the newest RECORDS_KEPT call records."""
    from astraea.runtime import runner as runner_module

    monkeypatch.setattr(runner_module, "RECORDS_KEPT", 5)
    torch._dynamo.reset()
    family = wan()
    be = astraea.backend(schedule=[1.0, 0.5, 0.0])
    compiled = torch.compile(family.model, backend=be)
    sample(family, compiled, steps=3)  # 6 calls: 3 steps x 2 branches
    sample(family, compiled, steps=3)
    records = be.runners[0].records
    assert len(records) == 5
    assert [(r.step, r.branch, r.budget) for r in records] == [(0, 1, 1.0), (1, 0, 0.5), (1, 1, 0.5), (2, 0, 0.0), (2, 1, 0.0)]
