"""For every video transformer class diffusers exports (tests/support_models.py): budget 1.0
compiled whole is the dense model, the lowered regions compute exactly what the whole rewritten
graph computes, `astraea.compile_blocks` at budget 1.0 gives the eager output, and the README's
support table holds the class's row as the analysis gives it today."""

import pytest

from tests.contract import check_regions
from tests.support_models import CASES, video_transformer_classes
from tests.support_table import (
    BEGIN, END, HEADER, README, compile_whole, in_table_order, readme_table, render_row, row, unlisted_rows,
)

REGENERATE = "regenerate it with `python -m tests.support_table --write` and commit README.md"


def readme_rows() -> list[str]:
    table = readme_table(README.read_text())
    assert table is not None, f"README.md has no {BEGIN} ... {END} section"
    return table.splitlines()


def label_of(line: str) -> str:
    """The row label of a table line (its first cell, the class name unquoted)."""
    return line.split(" | ")[0].removeprefix("| ").replace("`", "")


def test_every_listed_class_is_in_the_table():
    listed = video_transformer_classes()
    assert len(listed) >= 20, listed
    assert {case.cls for case in CASES} <= set(listed), "a factory for a class the listing does not find"


def test_readme_table_has_every_row_in_order():
    """The header, one row per case and per class without a factory, in the generated order (each
    case's cells are checked by its own test below)."""
    lines = readme_rows()
    assert "\n".join(lines[:2]) == HEADER, f"README.md's support table has another header; {REGENERATE}"
    unlisted = {r.label: render_row(r) for r in unlisted_rows()}
    order = in_table_order([case.label for case in CASES] + list(unlisted))
    found = [label_of(line) for line in lines[2:]]
    assert found == order, f"README.md's support table lists other rows; {REGENERATE}"
    assert [lines[2 + order.index(label)] for label in unlisted] == list(unlisted.values()), REGENERATE


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_class_at_budget_one_and_its_row(case):
    whole = compile_whole(case)
    assert whole.error <= 1e-5, f"{case.label}: budget 1.0 differs from eager, relative error {whole.error:.3g}"
    with case.traced():
        check_regions(whole.backend, whole.family, whole.compiled)
    fresh = row(case, whole)
    assert "MISMATCH" not in fresh.each_block, fresh.each_block
    line = {label_of(line): line for line in readme_rows()}.get(case.label)
    assert line == render_row(fresh), (
        f"README.md's row for {case.label} is not what the analysis says now; {REGENERATE}\n"
        f"README:    {line}\ngenerated: {render_row(fresh)}"
    )
