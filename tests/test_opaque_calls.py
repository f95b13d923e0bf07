"""Calls dynamo keeps opaque are inlined: research code written with einops (which registers its
functions with `allow_in_graph` before 0.8.2, the version the tests install) goes sparse, and a
call that cannot be replayed exactly stays as it is, the model still correct."""

import einops
import pytest
import torch
from packaging.version import Version

import astraea
from astraea.passes.opaque_calls import inline_opaque_calls
from tests.contract import check_generated
from tests.graphs import graph_of
from tests.generated import GeneratedDiT, Knobs, example_inputs


OPAQUE_EINOPS = Version(einops.__version__) < Version("0.8.2")  # registered with allow_in_graph


def _opaque(gm):
    """The calls dynamo kept whole: einops', and this file's `allow_in_graph` helpers."""
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__module__", "").startswith(("einops", __name__))]


@pytest.mark.parametrize("joint", [None, "dual", "single"])
def test_a_dit_written_with_einops_goes_sparse_and_keeps_the_contract(joint):
    k = Knobs(einops=True, fused_qkv=True, joint=joint)
    if OPAQUE_EINOPS:  # what the pass is for: dynamo leaves einops' calls whole
        assert _opaque(graph_of(GeneratedDiT(k).eval(), *example_inputs(k)))
    check_generated(k)


@torch._dynamo.allow_in_graph
def heads_first(x, heads):
    """A user's own opaque helper: [B, N, H * d] -> [B, H, N, d], through a view, a property and a method."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).mT.transpose(-1, -2).contiguous()


@torch._dynamo.allow_in_graph
def two_halves(x):
    return x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]


@torch._dynamo.allow_in_graph
def first_token_zeroed(x):
    y = x.clone()
    y[:, 0] = 0
    return y


@torch._dynamo.allow_in_graph
def seeded_noise(x):
    """Reads an object a graph cannot hold: a generator."""
    return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


@torch._dynamo.allow_in_graph
def scaled_in_place(x):
    return x.clone().mul_(2)


def test_a_tuple_read_item_by_item_is_inlined():
    x = torch.randn(2, 6, 8)
    gm = graph_of(lambda t: two_halves(t)[1] * 2 + two_halves(t)[0], x)
    assert inline_opaque_calls(gm) == 2
    assert not _opaque(gm)
    torch.testing.assert_close(gm(x)[0], x[..., 4:] * 2 + x[..., :4], rtol=0, atol=0)


def test_an_opaque_call_is_replaced_by_the_ops_it_runs():
    x = torch.randn(2, 6, 8)
    gm = graph_of(lambda t: heads_first(t, 2) * 3, x)
    assert len(_opaque(gm)) == 1
    assert inline_opaque_calls(gm) == 1
    assert not _opaque(gm)
    calls = [(n.op, n.target) for n in gm.graph.nodes if n.op.startswith("call")]
    assert ("call_method", "reshape") in calls and ("call_method", "contiguous") in calls
    assert ("call_function", getattr) in calls  # .mT, as dynamo writes a property read
    torch.testing.assert_close(gm(x)[0], heads_first(x, 2) * 3, rtol=0, atol=0)


def _pack_unpack(t):
    x, shapes = einops.pack([t, t + 1], "b * d")
    return einops.unpack(x * 2, shapes, "b * d")[1]


EINOPS_CALLS = {  # what research code writes with einops besides splitting heads
    "repeat (Latte's text over frames)": lambda t: einops.repeat(t, "b n d -> (b f) n d", f=3) * 2,
    "repeat (a new axis)": lambda t: einops.repeat(t, "b n d -> b h n d", h=4).sum(-1),
    "reduce (pooling)": lambda t: einops.reduce(t, "b (n p) d -> b n d", "mean", p=2) + 1,
    "einsum": lambda t: einops.einsum(t, t, "b n d, b m d -> b n m") - 1,
    "rearrange of a list": lambda t: einops.rearrange([t, t], "two b n d -> b n (two d)"),
    "pack and unpack (text and video as one sequence)": _pack_unpack,
}


@pytest.mark.parametrize("fn", EINOPS_CALLS.values(), ids=EINOPS_CALLS.keys())
def test_einops_calls_are_inlined(fn):
    x = torch.randn(2, 6, 8)
    gm = graph_of(fn, x)
    assert bool(_opaque(gm)) == OPAQUE_EINOPS
    inline_opaque_calls(gm)
    assert not _opaque(gm)
    torch.testing.assert_close(gm(x)[0], fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("fn", [seeded_noise, scaled_in_place, first_token_zeroed],
                         ids=["a generator", "in place", "an item set"])
def test_a_call_that_cannot_be_replayed_stays_as_it_is(fn):
    x = torch.randn(2, 6, 8)
    gm = graph_of(lambda t: fn(t), x)
    before = gm.code
    assert inline_opaque_calls(gm) == 0
    assert gm.code == before


def test_a_model_with_a_call_left_opaque_still_equals_eager():
    """The call stays whole, after the blocks, which still go sparse; at budget 1.0 the output is the model's."""

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = GeneratedDiT(Knobs(einops=True))

        def forward(self, latent, timestep, context):
            return seeded_noise(self.inner(latent, timestep, context))

    torch.manual_seed(0)
    model = Noisy().eval()
    torch._dynamo.reset()
    assert astraea.explain(model, *example_inputs(Knobs())).num_sparse_blocks == 2
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=astraea.backend(schedule=1.0))
    with torch.no_grad():
        for step in range(2):
            inputs = example_inputs(Knobs(), step)
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
