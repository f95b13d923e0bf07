"""Blocks dynamo traces into subgraphs of their own (run under activation checkpointing, or
marked `nested_compile_region`) are inlined: the model goes sparse and keeps the contract, the
inlined graph computes what the wrapped one did, and control flow is left alone."""

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from astraea.passes.subgraph_calls import inline_subgraph_calls
from tests.contract import check_generated
from tests.graphs import graph_of
from tests.generated import BlockStack, GeneratedDiT, Knobs, example_inputs, stack_inputs


def _wrappers(gm) -> list[str]:
    return [n.target.name() for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)]


@pytest.mark.parametrize("wrapped, joint", [
    ("checkpoint", None), ("checkpoint", "dual"), ("checkpoint", "single"), ("region", None), ("region", "dual"),
    # not ("region", "single"): dynamo refuses that block in a nested_compile_region (its two outputs alias)
])
def test_a_dit_with_wrapped_blocks_goes_sparse_and_keeps_the_contract(wrapped, joint):
    """Every block sparse, exact at budget 1.0, the contract below 1 (each fails without the pass:
    the token axis is lost at the first wrapper, `0 of 0 blocks sparse`)."""
    check_generated(Knobs(depth=2, width=16, heads=2, tokens=12, joint=joint, wrapped=wrapped))


@pytest.mark.parametrize("wrapped", ["checkpoint", "region"])
def test_the_inlined_graph_computes_what_the_wrapped_one_did(wrapped):
    k = Knobs(depth=3, width=16, heads=2, tokens=12, joint="dual", wrapped=wrapped)
    torch.manual_seed(0)
    model = GeneratedDiT(k).eval()
    inputs = example_inputs(k, step=1)
    inlined = []

    def inline(gm, _):
        inlined.append((len(_wrappers(gm)), inline_subgraph_calls(gm), _wrappers(gm)))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=inline, fullgraph=True)(*inputs)
        expected = model(*inputs)
    assert inlined == [(3, 3, [])]  # one wrapper per block, each inlined
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_region_called_by_every_block_is_named_after_each_caller():
    """Dynamo traces a `nested_compile_region` once and calls that subgraph from every block, its
    nodes named after blocks.0; inlined, each block's ops take its own module path. A fresh-clone
    run found why it matters: three STDiT layers (within frames, across, within) read as two
    blocks, the last ended past the output head where it was sized from blocks.0's ops."""
    import astraea

    names = {}
    for wrapped in (None, "region"):
        k = Knobs(depth=3, width=8, heads=1, tokens=6, rope=False, factorised=2, wrapped=wrapped)
        torch.manual_seed(0)
        torch._dynamo.reset()
        report = astraea.explain(GeneratedDiT(k).eval(), *example_inputs(k))
        names[wrapped] = [(b.module, b.sparse) for b in report.blocks]
    assert names["region"] == names[None] == [("blocks.0-1", True), ("blocks.2", True)]


class _Attention(nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, n, w))


class _Block(nn.Module):
    """Attention checkpointed on its own, inside a block that is checkpointed too."""

    def __init__(self, width=16):
        super().__init__()
        self.attn, self.mlp, self.mod = _Attention(width), nn.Linear(width, width), nn.Linear(width, 2 * width)

    def forward(self, x, temb):
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        x = x + torch.utils.checkpoint.checkpoint(self.attn, x * (1 + scale) + shift, use_reentrant=False)
        return x + self.mlp(x)


def test_nested_wrappers_are_inlined_to_the_last():
    """A checkpointed attention inside a checkpointed block: the inner subgraph, an attribute of
    the outer one, moves up with it and is inlined in turn; the model goes sparse."""
    from tests.contract import check_sparse_model

    torch.manual_seed(0)
    model, inputs = BlockStack([_Block(16), _Block(16)], 16, checkpointed=True).eval(), stack_inputs(10)
    gm = graph_of(model, *inputs(0))
    assert len(_wrappers(gm)) == 2
    assert inline_subgraph_calls(gm) == 4 and _wrappers(gm) == []
    check_sparse_model(model, inputs, 2)


def test_control_flow_is_left_alone():
    """`torch.cond` also calls subgraphs, but which one runs depends on a value: not a wrapper,
    so its call stays as it is."""

    def f(x):
        return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,)) + 1

    x = torch.randn(3)
    gm = graph_of(f, x)
    before = _wrappers(gm)
    assert before and inline_subgraph_calls(gm) == 0 and _wrappers(gm) == before
    (out,) = gm(x)
    torch.testing.assert_close(out, f(x))


def test_inlined_blocks_lower_with_inductor_as_they_run_eagerly():
    """The inlined graph through the default path on a CPU build with Inductor: each block's
    region lowered once, budgets 1 and 0.25 as the eager lowering gives them."""
    import astraea

    k = Knobs(depth=2, width=16, heads=2, tokens=12, wrapped="checkpoint")
    outs = {}
    for lowering in ("eager", "inductor"):
        torch.manual_seed(0)
        model = GeneratedDiT(k).eval()
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.25], lowering=lowering)
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            outs[lowering] = [compiled(*example_inputs(k, step)) for step in range(2)]
        assert be.reports[0].num_sparse_blocks == 2
    for inductor, eager in zip(outs["inductor"], outs["eager"]):
        torch.testing.assert_close(inductor, eager, rtol=1e-4, atol=1e-5)
