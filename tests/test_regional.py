"""Regional lowering (the default): the rewritten graph is cut at the blocks' ends and each
distinct region lowered once. It must compute exactly what the whole graph computes, on every
class that goes sparse, and one lowered region must serve every block of a stack."""

import warnings

import pytest
import torch

import astraea
from astraea.lowering import RegionalGraph
from tests.models import hunyuan, ltx, sample, wan
from tests.support_models import CASES

SCHEDULE = [1.0, 0.5, 0.0, 0.3]  # dense, sparse, a skipped step (its own graph), sparse again


class SameAsWhole:
    """Stands in for a runner's regional graph: runs the whole graph it was cut from on copies
    of each call's inputs first, then the regions, and checks that outputs and the updated
    caches and scores are bit-identical."""

    def __init__(self, regional: RegionalGraph):
        assert isinstance(regional, RegionalGraph)
        self.regional, self.calls = regional, 0

    def __call__(self, *args):
        copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        expected = self.regional.graph_module(*copies)
        out = self.regional(*args)
        torch.testing.assert_close(out, tuple(expected), rtol=0, atol=0)
        torch.testing.assert_close(list(args), copies, rtol=0, atol=0)  # in-place state updates
        self.calls += 1
        return out


def checked(family, **options):
    """Compile, then sample SCHEDULE with every call, the skipped one too, checked against the whole graph."""
    torch._dynamo.reset()
    be = astraea.backend(schedule=SCHEDULE, **options)
    compiled = torch.compile(family.model, backend=be)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample(family, compiled, steps=1)  # compiles
    for runner in be.runners:
        runner.reset()
        runner.records.clear()
        runner.graph_fn = SameAsWhole(runner.graph_fn)
        runner.lower_skip = lambda lower=runner.lower_skip: SameAsWhole(lower())
    sample(family, compiled, steps=len(SCHEDULE))
    return be


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_regions_compute_what_the_whole_graph_computes(case):
    be = checked(case.build())
    if not be.runners:
        pytest.skip("runs dense (see the support table)")
    for runner in be.runners:
        skipped = sum(r.tokens == 0 for r in runner.records)
        assert runner.graph_fn.calls == len(runner.records) - skipped > 0
        assert (runner._skip_fn.calls if runner._skip_fn else 0) == skipped  # MiniMax-H3 reads no sampler time


@pytest.mark.parametrize("make", [wan, ltx], ids=["wan", "ltx"])
def test_one_lowered_region_serves_every_block(make):
    """The embeddings, one block and the output head: three lowered regions however deep the stack."""
    for layers in (2, 5):
        be = checked(make(layers=layers))
        graph = be.runners[0].graph_fn.regional
        assert (graph.num_regions, graph.num_lowered) == (layers + 2, 3)


def test_block_kinds_each_lowered_once():
    """HunyuanVideo: dual-stream blocks, then single-stream blocks. Deeper stacks add regions but
    nothing to lower: the embeddings (with the text refiner), a dual-stream block, the first
    single-stream block (its text arrives contiguous, not as a slice), a single-stream block,
    the last one (whose text part nobody reads) and the output head."""
    shallow = checked(hunyuan(double=2, single=3)).runners[0].graph_fn.regional
    deep = checked(hunyuan(double=3, single=5)).runners[0].graph_fn.regional
    assert (shallow.num_regions, deep.num_regions) == (7, 10)
    assert shallow.num_lowered == deep.num_lowered == 6


def test_whole_graph_mode_still_runs():
    torch._dynamo.reset()
    family = wan(layers=3)
    outs = {}
    for regional in (True, False):
        torch._dynamo.reset()
        be = astraea.backend(schedule=SCHEDULE, regional=regional)
        outs[regional] = sample(family, torch.compile(family.model, backend=be), steps=len(SCHEDULE))
        assert isinstance(be.runners[0].graph_fn, RegionalGraph) == regional
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
