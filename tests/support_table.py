"""The README's support table: what `astraea.explain` says of every video transformer class, and
how many of its blocks go sparse under `astraea.compile_blocks`. The first comes from the class
compiled whole at budget 1.0 (`compile_whole`), which tests/test_support_table.py also checks
against eager: one dynamo trace of each model serves both.

    python -m tests.support_table           # print the table
    python -m tests.support_table --write   # and put it in README.md, between the markers
    python -m tests.support_table --inductor   # every case lowered by Inductor against the eager lowering

One row per factory in `tests.support_models.CASES` (a class may have variants, such as Wan 2.2's
per-token timestep), and a "no small config yet" row for each class that
`video_transformer_classes()` lists without a factory. tests/test_support_table.py checks that the
README holds what this module generates.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from torch._dynamo.backends.debugging import ExplainWithBackend

import astraea
from astraea.blockwise import repeated_blocks
from astraea.explain import summarise
from tests.models import sample
from tests.support_models import CASES, Case, video_transformer_classes

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- support-table:begin -->"
END = "<!-- support-table:end -->"
MAX_REASON = 200  # characters of one reason in the table


@dataclass(frozen=True)
class Row:
    label: str
    blocks: str  # "sparse / all", or "-" where there is no report
    notes: str  # why blocks stay dense, the error, or that there is no factory
    each_block: str = "-"  # "sparse / all" blocks under astraea.compile_blocks


def _clean(text: str) -> str:
    """One reason as a table cell: node-name counters dropped (dynamo numbers repeated names,
    `hidden_states_34`, so the same reason in two blocks reads the same), one line, pipes escaped."""
    text = re.sub(r"\b([A-Za-z][A-Za-z_]*?)_\d+\b", r"\1", " ".join(str(text).split()))
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return text.replace("|", "\\|")


@dataclass
class WholeModel:
    """A case's model compiled whole at budget 1.0, as `torch.compile(model, backend=
    astraea.backend(schedule=1.0))` runs it, after a first call at the example inputs and a
    two-step CFG loop: `report` is what `astraea.explain` says of that first call (the same
    analysis of the same graphs: one dynamo trace serves both), `error` the loop's relative
    distance from eager."""

    family: object
    backend: astraea.Backend
    compiled: torch.nn.Module
    report: object
    error: float


def compile_whole(case: Case) -> WholeModel:
    torch._dynamo.reset()
    family = case.build()
    be = astraea.backend(schedule=1.0)
    watch = ExplainWithBackend(be)  # dynamo's graph break reasons, around astraea's backend
    compiled = torch.compile(family.model, backend=watch)
    with case.traced(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "runs dense, because ..." for the classes the analysis leaves dense
        # First, the call astraea.explain would trace, on a model no call has run yet: a module
        # that caches on its first call (Wan-Animate 2's masks) traces otherwise afterwards.
        compiled(**family.example())
        report = summarise(list(be.reports), list(watch.break_reasons))
        reference = sample(family, family.model, steps=2)
        out = sample(family, compiled, steps=2)
    error = (torch.linalg.norm(out - reference) / torch.linalg.norm(reference)).item()
    return WholeModel(family, be, compiled, report, error)


def analysis_cells(report) -> tuple[str, str]:
    """("sparse / all" blocks, why blocks stay dense) of a report, as the table shows them."""
    reasons = [report.reason] if report.reason else []
    sparse, blocks = report.num_sparse_blocks, report.num_blocks
    if report.graph_breaks:  # the blocks may be cut apart: the break is what a user can act on
        reasons.insert(0, f"dynamo splits the call into {len(report.graphs)} graphs, at {'; '.join(report.graph_breaks)}")
        reasons += [g.reason for g in report.graphs if g.reason]
        sparse, blocks = sum(g.sparse_blocks for g in report.graphs), sum(g.blocks for g in report.graphs)
    reasons += [b.reason for b in report.blocks if not b.sparse and b.reason]
    return f"{sparse} / {blocks}", "; ".join(dict.fromkeys(_clean(r) for r in reasons))


def row(case: Case, whole: WholeModel | None = None) -> Row:
    """The case's row (compiling it whole when `whole` is not given); never raises: a model
    that fails to compile gets a row that names the error."""
    try:
        whole = whole or compile_whole(case)
    except Exception as e:  # the row reports it; the table goes on
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return Row(case.label, "-", _clean(f"error: {type(e).__name__}: {first}"))
    finally:
        torch._dynamo.reset()
    blocks, notes = analysis_cells(whole.report)
    return Row(case.label, blocks, notes, compile_blocks_cell(case))


def compile_blocks_cell(case: Case) -> str:
    """"sparse / all" blocks of the case's model under `astraea.compile_blocks`, after one call
    at its example inputs: those that select among the video's tokens, of all it compiled (a
    text refiner computes every token). That call runs at budget 1.0 and must give the eager
    output; where it does not, the cell says so (MISMATCH), as it names an error ("-")."""
    torch._dynamo.reset()
    try:
        family = case.build()
        x = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(0))
        args = (x, torch.tensor([500.0]), family.conditions[0])
        with case.traced(), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            eager = family.call(family.model, *args)
            be = astraea.compile_blocks(family.model, schedule=1.0)
            out = family.call(family.model, *args)
    except Exception as e:
        return f"- ({type(e).__name__})"
    finally:
        torch._dynamo.reset()
    sparse = sum(len(r.instances) for r in be.runners if r.report.num_tokens == be.clock.tokens)
    cell = f"{sparse} / {len(repeated_blocks(family.model))}"
    error = (torch.linalg.norm(out - eager) / torch.linalg.norm(eager)).item()
    return cell if error <= 1e-5 else f"{cell}, MISMATCH: {error:.2g} from eager at budget 1.0"


def unlisted_rows() -> list[Row]:
    """A row for each class `video_transformer_classes()` lists without a factory in CASES."""
    covered = {case.cls for case in CASES}
    return [Row(name, "-", "no small config yet") for name in video_transformer_classes() if name not in covered]


def in_table_order(labels: list[str]) -> list[str]:
    """Row labels in the table's order: by class name, then variant."""
    order = {name: i for i, name in enumerate(sorted({c.cls for c in CASES} | set(video_transformer_classes())))}
    cls_of = {case.label: case.cls for case in CASES}
    return sorted(labels, key=lambda label: (order[cls_of.get(label, label)], label))


def rows() -> list[Row]:
    by_label = {r.label: r for r in [row(case) for case in CASES] + unlisted_rows()}
    return [by_label[label] for label in in_table_order(list(by_label))]


HEADER = "| diffusers class | sparse blocks | with `compile_blocks` | why blocks stay dense |\n|---|---|---|---|"


def render_row(r: Row) -> str:
    cls, _, variant = r.label.partition(" ")
    label = f"`{cls}`" + (f" {variant}" if variant else "")
    return f"| {label} | {r.blocks} | {r.each_block} | {r.notes} |"


def render(table_rows: list[Row]) -> str:
    return "\n".join([HEADER] + [render_row(r) for r in table_rows])


def generate() -> str:
    return render(rows())


def readme_table(text: str) -> str | None:
    """The table between the markers of a README's text, or None when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN) : end].strip()


def write_readme(table: str, path: Path = README) -> None:
    text = path.read_text()
    if readme_table(text) is None:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to write the table between")
    start, end = text.find(BEGIN) + len(BEGIN), text.find(END)
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])


def inductor_line(case: Case, budgets=(1.0, 0.5, 0.25)) -> str:
    """The case sampled at `budgets` with Inductor lowering against the eager lowering, compiled whole
    (regional lowering) and block by block (`compile_blocks`): what the suite, which lowers eagerly on
    a CPU, cannot see (Inductor's code checks its inputs' strides; a region key that ignored a stride
    once ran HunyuanVideo's second block on the first's code)."""
    cells = []
    for blocks in (False, True):
        outs = {}
        for lowering in ("eager", "inductor"):
            family = case.build()
            torch._dynamo.reset()
            with case.traced(), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                try:
                    if blocks:
                        astraea.compile_blocks(family.model, schedule=list(budgets), lowering=lowering)
                        model = family.model
                    else:
                        be = astraea.backend(schedule=list(budgets), lowering=lowering)
                        model = torch.compile(family.model, backend=be)
                    outs[lowering] = sample(family, model, steps=len(budgets))
                except Exception as e:  # reported per case, as the table reports each
                    outs = f"{lowering} lowering failed: {type(e).__name__}: {_clean(str(e))[:200]}"
                    break
        if isinstance(outs, dict):
            distance = torch.linalg.norm(outs["inductor"] - outs["eager"]) / torch.linalg.norm(outs["eager"])
            outs = f"{distance.item():.1e}"
        how = "compile_blocks" if blocks else f"whole ({sum(r.num_sparse_blocks for r in be.reports)} sparse)"
        cells.append(f"{how} {outs}")
    torch._dynamo.reset()
    return f"{case.label}, Inductor against eager lowering, relative distance: " + "; ".join(cells)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support_table", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {README.name}")
    parser.add_argument("--inductor", action="store_true",
                        help="instead, sample every case lowered by Inductor and by eager at budgets 1, 0.5, 0.25, "
                             "compiled whole and block by block, and print their distance (15 minutes on a CPU)")
    args = parser.parse_args(argv)
    if args.inductor:
        for case in CASES:
            print(inductor_line(case), flush=True)
        return 0
    table = generate()
    print(table)
    if args.write:
        write_readme(table)
        print(f"wrote {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
