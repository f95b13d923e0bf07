"""Regional lowering (the default): the rewritten graph is cut at the blocks' ends and each
distinct region lowered once. One lowered region must serve every block of a stack. That the
regions compute exactly what the whole graph computes is checked on every class that goes
sparse in tests/test_support_table.py (`check_regions`)."""

import pytest
import torch

import astraea
from astraea.lowering import RegionalGraph
from astraea.passes.regions import cut
from tests.contract import REGIONS_SCHEDULE, check_regions
from tests.models import hunyuan, ltx, sample, wan
from tests.support_models import CASES

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
    nothing to lower: the embeddings (with the text refiner) and the first dual-stream block, fed
    the video transposed (the merges feed the others contiguous: see the next test), a
    dual-stream block, the first single-stream block (its text arrives contiguous, not as a
    slice), a single-stream block, the last one (whose text part nobody reads) and the output head."""
    shallow = checked(hunyuan(double=2, single=3)).runners[0].graph_fn.regional
    deep = checked(hunyuan(double=3, single=5)).runners[0].graph_fn.regional
    assert (shallow.num_regions, deep.num_regions) == (6, 9)
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


def _anyflow():
    return next(c for c in CASES if c.label == "AnyFlowTransformer3DModel").build()


@pytest.mark.parametrize("make", [_anyflow, lambda: hunyuan(double=2, single=1)], ids=["anyflow", "hunyuan"])
def test_a_block_fed_another_layout_gets_its_own_lowering(make):
    """AnyFlow's and HunyuanVideo's embeddings hand the first block the video transposed ([B, N,
    C] with the channels outermost), and each block's merge hands the next a contiguous tensor:
    code Inductor lowered for the first block checks its input strides and refused the second's.
    The keys tell the two apart, and a budget below 1 equals the eager lowering."""
    outs, graphs = {}, {}
    for lowering in ("eager", "inductor"):
        family = make()
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.25], lowering=lowering)
        outs[lowering] = sample(family, torch.compile(family.model, backend=be), steps=2)
        graphs[lowering] = be.runners[0].graph_fn
    blocks = [r for r in cut(graphs["inductor"].graph_module.graph) if r.is_block]
    assert blocks[0].key != blocks[1].key
    torch.testing.assert_close(outs["inductor"], outs["eager"], rtol=1e-4, atol=1e-5)
