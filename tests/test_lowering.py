"""The Inductor lowering (used on GPU) gives the eager rewrite's results, with K symbolic."""

import uuid

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import astraea
from astraea.lowering import LOWERING_FAILED
from astraea.ops.sparse import pad_channels
from tests.contract import check_sparse_model
from tests.models import sample, wan


@pytest.mark.parametrize("batch, regional", [(1, True), (2, True), (1, False)])  # one selection, or one per sample
def test_inductor_lowering_matches_eager_and_serves_every_budget(batch, regional):
    torch._dynamo.reset()
    family = wan(batch=batch, layers=3)
    schedule = [1.0, 0.5, 0.3, 0.7, 0.0, 1.0]
    inductor = astraea.backend(schedule=schedule, lowering="inductor", regional=regional)
    compiled = torch.compile(family.model, backend=inductor)
    out = sample(family, compiled, steps=len(schedule))
    with torch.compiler.set_stance("fail_on_recompile"):
        again = sample(family, compiled, steps=len(schedule))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    eager = astraea.backend(schedule=schedule, lowering="eager")
    reference = sample(family, torch.compile(family.model, backend=eager), steps=len(schedule))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(inductor.runners) == 1
    graph = inductor.runners[0].graph_fn
    if regional:  # the embeddings, one block for all three, the output head: each lowered once
        assert (graph.num_regions, graph.num_lowered) == (5, 3)
        graph = graph.steps[1][0]
        assert all(step[0] is graph for step in inductor.runners[0].graph_fn.steps[1:4])
    assert not isinstance(graph, torch.fx.GraphModule)  # really lowered
    assert {b.samples for b in inductor.runners[0].blocks} == {batch}


class _RefusingPass(CustomGraphPass):
    """An Inductor pass that fails on every graph, as Inductor itself fails on some (torch 2.11's C++
    code for CPU does not compile for the lowering's index checks): its own hook, a new key each
    time, so that no cached graph skips it."""

    def __init__(self):
        self.key, self.calls = uuid.uuid4().hex, 0

    def __call__(self, graph):
        self.calls += 1
        raise RuntimeError("this pass refuses every graph")

    def uuid(self):
        return self.key


def test_a_graph_inductor_cannot_lower_runs_eagerly_with_a_warning():
    torch._dynamo.reset()
    family = wan(batch=1, layers=3)
    schedule = [1.0, 0.5, 0.3, 1.0]
    eager = astraea.backend(schedule=schedule, lowering="eager")
    reference = sample(family, torch.compile(family.model, backend=eager), steps=len(schedule))
    torch._dynamo.reset()
    inductor, refusing = astraea.backend(schedule=schedule, lowering="inductor"), _RefusingPass()
    failed = f"{LOWERING_FAILED} a block of .*RuntimeError: this pass refuses every graph"
    with torch._inductor.config.patch(post_grad_custom_post_pass=refusing), pytest.warns(astraea.AstraeaWarning,
                                                                                         match=failed):
        out = sample(family, torch.compile(family.model, backend=inductor), steps=len(schedule))
    assert refusing.calls
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    block = inductor.runners[0].graph_fn.steps[1][0]
    assert isinstance(block, torch.fx.GraphModule)  # the rewritten block, run eagerly


@pytest.mark.parametrize("widths", [(0, 112), (1, 2), (0, 0, 0, 0, 2, 0), (-1, 3)])
def test_the_rows_form_of_a_pad_keeps_the_rows_symbolic(widths):
    """aten's pad reads every size as a number, which fixed K at the lowering's hint (SANA-WM pads
    its head dim to 128 for FlashAttention: the lowered code then refused every other budget)."""
    x = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(pad_channels(x, widths, None), F.pad(x, widths), rtol=0, atol=0)
    torch.testing.assert_close(pad_channels(x, widths, 2.0), F.pad(x, widths, value=2.0), rtol=0, atol=0)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    rows = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.STATIC, DimDynamic.DYNAMIC,
                                                   DimDynamic.STATIC], constraint_sizes=[None] * 4)
    fake = mode.from_tensor(x, symbolic_context=rows)
    with mode:
        padded = pad_channels(fake, widths, None)
    assert not env.replacements and isinstance(padded.shape[2], torch.SymInt)


class Padded(torch.nn.Module):
    """Two blocks whose attention pads the head dim to a size the kernels take, and slices it back;
    with `tokens`, the token count rounded up to a multiple of 8 too (zero rows, sliced off after)."""

    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.time = torch.nn.Linear(1, 16)
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(16, 48) for _ in range(2)])
        self.out = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x, t):
        shift = self.time(t[:, None])[:, None]
        n = x.shape[1]
        for qkv, out in zip(self.qkv, self.out):
            h = x + shift
            h = F.pad(h, (0, 0, 0, -n % 8)) if self.tokens else h
            q, k, v = (F.pad(h, (0, 8)) for h in qkv(h).unflatten(-1, (3, 2, 8)).transpose(1, 3).unbind(2))
            a = F.scaled_dot_product_attention(q, k, v)[..., :8]
            x = x + out(a.transpose(1, 2).flatten(2)[:, :n])
        return x


@pytest.mark.parametrize("tokens", [False, True])
def test_padding_lowers_once_for_every_budget_and_keeps_the_contract(tokens):
    torch.manual_seed(0)
    model, x = Padded(tokens).eval(), torch.randn(1, 12, 16)
    check_sparse_model(model, lambda step: (x + 0.1 * step, torch.tensor([900.0 - 100 * step])), 2)
    outs = {}
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.5, 0.25, 0.75], lowering=lowering)
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            outs[lowering] = [compiled(x + 0.1 * i, torch.tensor([900.0 - 100 * i])) for i in range(4)]
        assert be.reports[0].num_sparse_blocks == 2
    torch._dynamo.reset()
    for got, expected in zip(outs["inductor"], outs["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_cross_attention_masked_per_query_runs_as_astraeas_op():
    """A cross-attention whose mask has a row per query (here a flex block mask over 5 text keys)
    masks the selected rows in its rows form. As torch's SDPA it would, on a GPU, pad the 5-key
    mask with `constant_pad_nd`, which fixed K at the lowering's hint (the lowered code then
    refused every other budget); as astraea's attention op it stays symbolic."""
    from tests.generated import GeneratedDiT, Knobs, example_inputs

    torch.manual_seed(0)
    k = Knobs(flex=True, score_mask=True)
    model, inputs = GeneratedDiT(k).eval(), example_inputs(k)
    torch._dynamo.reset()
    be = astraea.backend(schedule=1.0, lowering="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=be)(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    graph = be.runners[0].graph_fn.graph_module.graph
    attention = [n for n in graph.nodes if n.target is torch.ops.astraea.sparse_attention]
    sdpa = [n for n in graph.nodes if n.target in astraea.passes.rules.SDPA and n.kwargs.get("attn_mask") is not None]
    assert len(attention) == 2 * k.depth  # the self- and the cross-attention of each block
    assert all("_rows" not in n.name for n in sdpa)  # any masked SDPA left is the dense form's
    torch._dynamo.reset()


def test_torch_caches_key_the_lowered_code_by_the_ops_source(monkeypatch):
    """Torch's caches key a lowered graph by its code, which names astraea's ops but not what
    their fake kernels say of their outputs' layout: code lowered against an earlier version of
    them loaded and failed its stride checks at the first call. The ops' source, hashed, is in
    the key: the same graph lowered again loads from the cache (in one process too: the selected
    rows' symbol is named the same every time), and lowers anew once the ops change."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_inductor_cache

    import astraea.lowering

    users_tag = torch.compiler.config.cache_key_tag

    def lowered_from_cache() -> bool:
        torch._dynamo.reset()
        family = wan(layers=1)
        hits = counters["inductor"]["fxgraph_cache_hit"]
        sample(family, torch.compile(family.model, backend=astraea.backend(schedule=1.0, lowering="inductor")), 1)
        return counters["inductor"]["fxgraph_cache_hit"] > hits

    with fresh_inductor_cache():
        assert not lowered_from_cache()
        assert lowered_from_cache()
        monkeypatch.setattr(astraea.lowering, "_OPS_TAG", astraea.lowering._OPS_TAG + "-changed")
        assert not lowered_from_cache()
    assert torch.compiler.config.cache_key_tag == users_tag
