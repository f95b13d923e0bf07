"""For every video transformer class diffusers exports (tests/support_models.py), budget 1.0
compiled whole is the dense model, and the lowered regions compute exactly what the whole
rewritten graph computes."""

import warnings

import pytest
import torch

import astraea
from tests.contract import check_regions
from tests.models import sample
from tests.support_models import CASES


@pytest.mark.parametrize("case", CASES, ids=[case.build.__name__ for case in CASES])
def test_budget_one_equals_eager(case):
    torch._dynamo.reset()
    family = case.build()
    reference = sample(family, family.model, steps=2)
    be = astraea.backend(schedule=1.0)
    compiled = torch.compile(family.model, backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "runs dense, because ..." for the classes the analysis leaves dense
        out = sample(family, compiled, steps=2)
    assert out.shape == reference.shape
    error = (torch.linalg.norm(out - reference) / torch.linalg.norm(reference)).item()
    assert error <= 1e-5, f"{case.label}: budget 1.0 differs from eager, relative error {error:.3g}"
    check_regions(be, family, compiled)
    torch._dynamo.reset()
