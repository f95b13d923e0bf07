"""The README's support table is what the analysis says today; for every video transformer class
diffusers exports (tests/support_models.py), budget 1.0 is the dense model (compiled whole, and
block by block with `astraea.compile_blocks`, whose call the table makes), and the lowered regions
compute exactly what the whole rewritten graph computes."""

import difflib
import warnings

import pytest
import torch

import astraea
from tests.contract import check_regions
from tests.models import sample
from tests.support_models import CASES, video_transformer_classes
from tests.support_table import BEGIN, END, README, readme_table, render, rows


def test_every_listed_class_is_in_the_table():
    listed = video_transformer_classes()
    assert len(listed) >= 20, listed
    assert {case.cls for case in CASES} <= set(listed), "a factory for a class the listing does not find"


@pytest.fixture(scope="module")
def table() -> list:
    return rows()


def test_readme_table_is_current(table):
    current = readme_table(README.read_text())
    assert current is not None, f"README.md has no {BEGIN} ... {END} section"
    fresh = render(table)
    diff = "\n".join(
        difflib.unified_diff(current.splitlines(), fresh.splitlines(), "README.md", "generated", lineterm="")
    )
    assert current == fresh, (
        "README.md's support table is not what the analysis says now; regenerate it with "
        f"`python -m tests.support_table --write` and commit README.md\n{diff}"
    )


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


def test_compile_blocks_equals_eager_for_every_class(table):
    """The table's compile_blocks call runs at budget 1.0: it must give the eager output."""
    wrong = [f"{r.label}: {r.each_block}" for r in table if "MISMATCH" in r.each_block]
    assert not wrong, wrong
