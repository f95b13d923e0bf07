"""The README's support table is what the analysis says today, and for every video transformer
class diffusers exports (tests/support_models.py) `astraea.compile_blocks` at budget 1.0 (the call
the table makes) gives the dense model. Compiled whole: tests/test_support_budget_one.py (a file
of its own, so that the two run on different workers)."""

import difflib

import pytest

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


def test_compile_blocks_equals_eager_for_every_class(table):
    """The table's compile_blocks call runs at budget 1.0: it must give the eager output."""
    wrong = [f"{r.label}: {r.each_block}" for r in table if "MISMATCH" in r.each_block]
    assert not wrong, wrong
