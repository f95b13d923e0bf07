"""Regional lowering (the default): the rewritten graph is cut at the blocks' ends and each
distinct region lowered once. One lowered region must serve every block of a stack. That the
regions compute exactly what the whole graph computes is checked on every class that goes
sparse in tests/test_support_table.py (`check_regions`)."""

import pytest
import torch

import astraea
from astraea.lowering import RegionalGraph
from tests.contract import REGIONS_SCHEDULE, check_regions
from tests.models import hunyuan, ltx, sample, wan

def checked(family):
    """Compile, then sample the regions' schedule with every call checked against the whole graph."""
    torch._dynamo.reset()
    be = astraea.backend(schedule=1.0)
    compiled = torch.compile(family.model, backend=be)
    sample(family, compiled, steps=1)  # compiles
    check_regions(be, family, compiled)
    return be


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
        be = astraea.backend(schedule=REGIONS_SCHEDULE, regional=regional)
        outs[regional] = sample(family, torch.compile(family.model, backend=be), steps=len(REGIONS_SCHEDULE))
        assert isinstance(be.runners[0].graph_fn, RegionalGraph) == regional
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
