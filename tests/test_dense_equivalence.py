"""Budget 1.0 is the dense model: same output as eager over a multi-step CFG loop."""

import pytest
import torch

import astraea
from tests.models import FAMILIES, sample


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_budget_one_equals_eager(name, recwarn):
    torch._dynamo.reset()
    family = FAMILIES[name]()
    reference = sample(family, family.model)
    be = astraea.backend(schedule=1.0)
    compiled = torch.compile(family.model, backend=be)
    out = sample(family, compiled)
    assert torch.linalg.norm(out - reference) / torch.linalg.norm(reference) <= 1e-5
    report = be.reports[0]
    if family.sparse:
        assert report.num_sparse_blocks == report.num_blocks >= 2
        runner = be.runners[0]
        assert [r.branch for r in runner.records[:4]] == [0, 1, 0, 1]
        assert [r.step for r in runner.records] == [0, 0, 1, 1, 2, 2, 3, 3]
    else:
        assert report.num_sparse_blocks == 0
        assert any("dense" in str(w.message) for w in recwarn.list)
