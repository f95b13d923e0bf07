"""`flex_attention` whose score and mask functions SDPA has reads as SDPA: diffusers' `"flex"` backend
on its models (no mask, a float mask, a bool mask) goes sparse and keeps the contract; the rewritten
graph computes what flex_attention did, with the block mask's code gone; other functions stay."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import attention_dispatch as dispatch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from astraea.passes.flex_attention import FLEX, attention_from_flex
from astraea.passes.graph_edits import drop_dead_code
from tests.contract import check_generated
from tests.generated import Knobs
from tests.graphs import graph_of
from tests.models import hunyuan, ltx, wan
from tests.test_contract import checked_run


@pytest.mark.parametrize("make", [wan, ltx, hunyuan], ids=["wan", "ltx", "hunyuan"])
def test_models_on_the_flex_backend_go_sparse_and_keep_the_contract(make, monkeypatch):
    """Wan's self-attention has no mask (flex's default, an empty block mask); LTX's text mask
    reaches its cross-attention as a float bias (a score_mod adding it); HunyuanVideo's as a bool
    mask (a mask_mod reading it, through `create_block_mask`). Without the pass: `0 of 0 blocks
    sparse`, no attention op found."""
    # set_attention_backend also makes "flex" every model's default, process-wide: restored after
    registry = dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    family = make()
    family.model.set_attention_backend("flex")
    with torch.no_grad():
        be, checker = checked_run(family, 3, schedule=[1.0, 0.5, 0.25])
    report = be.reports[0]
    assert report.num_sparse_blocks == report.num_blocks > 0, str(report)
    assert checker.checked == 6 * report.num_sparse_blocks


@pytest.mark.parametrize("joint", [None, "dual", "single"])
@pytest.mark.parametrize("masked", [False, True])
def test_a_dit_on_flex_attention_goes_sparse_and_keeps_the_contract(joint, masked):
    """The generated DiT with flex_attention, plain or with its last key masked by a block mask
    (`create_block_mask` over a bool mask), self-attention alone or joint with the text."""
    check_generated(Knobs(flex=True, score_mask=masked, joint=joint))


def _inputs(heads=2, kv_heads=2, tokens=6, kv_tokens=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, heads, tokens, 8, generator=g),
            *(torch.randn(2, kv_heads, kv_tokens, 8, generator=g) for _ in range(2)))


def _bias_of(q, k):
    return torch.linspace(-1, 1, k.shape[2]).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _with_bias(q, k, v):
    bias = _bias_of(q, k)
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[b, h, i, j])


def _with_mask(q, k, v):
    keep = (torch.arange(k.shape[2]) < k.shape[2] - 2).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    block_mask = create_block_mask(lambda b, h, i, j: keep[b, h, i, j], q.shape[0], None, q.shape[2], k.shape[2],
                                   device="cpu")
    return flex_attention(q, k, v, block_mask=block_mask)


def _causal(q, k, v):
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[2], k.shape[2], device="cpu")
    return flex_attention(q, k, v, block_mask=block_mask, scale=0.2)


REWRITTEN = {  # form: (attention on q, k, v; the inputs; SDPA of the same)
    "plain": (flex_attention, _inputs(), F.scaled_dot_product_attention),
    "grouped_query": (lambda q, k, v: flex_attention(q, k, v, enable_gqa=True), _inputs(kv_heads=1),
                      lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
    "cross": (flex_attention, _inputs(kv_tokens=5), F.scaled_dot_product_attention),
    "float_bias": (_with_bias, _inputs(kv_tokens=5),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_bias_of(q, k))),
    "bool_mask": (_with_mask, _inputs(kv_tokens=5), lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=(torch.arange(k.shape[2]) < k.shape[2] - 2).expand(q.shape[2], -1))),
    "causal": (_causal, _inputs(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2)),
}


@pytest.mark.parametrize("form", REWRITTEN)
def test_the_rewritten_graph_computes_what_flex_attention_did(form):
    attention, inputs, sdpa = REWRITTEN[form]
    gm = graph_of(lambda q, k, v: attention(q, k, v) * 2, *inputs)
    assert attention_from_flex(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention in targets and FLEX not in targets
    assert not any("vmap" in str(t) or "batch_dim" in str(t) for t in targets)  # the block mask's code is gone
    with torch.no_grad():
        expected = attention(*inputs) * 2
        torch.testing.assert_close(sdpa(*inputs) * 2, expected, rtol=1e-5, atol=1e-5)
        named = dict(zip(("L_q_", "L_k_", "L_v_"), inputs))  # dynamo orders its inputs by first use
        (out,) = gm(*[named[n.target] for n in gm.graph.nodes if n.op == "placeholder"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _window(q, k, v):
    block_mask = create_block_mask(lambda b, h, i, j: (i - j).abs() <= 1, None, None, q.shape[2], k.shape[2],
                                   device="cpu")
    return flex_attention(q, k, v, block_mask=block_mask)


def _bias_and_causal(q, k, v):
    bias = _bias_of(q, k)
    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[2], k.shape[2], device="cpu")
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + bias[b, h, i, j], block_mask=block_mask)


def _own_block_lists(q, k, v):
    """Each block of two queries attends to its own two keys: sparsity in the block lists alone,
    with the default mask_mod that keeps everything (as Kandinsky 6 SR's NABLA attention)."""
    blocks = q.shape[2] // 2
    block_mask = BlockMask.from_kv_blocks(torch.ones(1, 1, blocks, dtype=torch.int32),
                                          torch.arange(blocks, dtype=torch.int32).view(1, 1, blocks, 1).repeat(1, 1, 1, blocks),
                                          BLOCK_SIZE=2, seq_lengths=(q.shape[2], k.shape[2]))
    return flex_attention(q, k, v, block_mask=block_mask)


LEFT_ALONE = {
    "sliding_window": _window,
    "own_block_lists": _own_block_lists,
    "softcap": lambda q, k, v: flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: 5 * torch.tanh(s / 5)),
    "log_sum_exp_read": lambda q, k, v: flex_attention(q, k, v, return_lse=True)[1],
    "bias_and_mask": _bias_and_causal,
}


@pytest.mark.parametrize("form", LEFT_ALONE)
def test_functions_sdpa_does_not_have_are_left_alone(form):
    gm = graph_of(LEFT_ALONE[form], *_inputs())
    before = str(gm.graph)
    assert attention_from_flex(gm) == 0
    assert str(gm.graph) == before


def test_dead_code_keeps_writes_into_what_is_kept():
    """A write into a tensor the output reads is kept, and so is one into a view of an input;
    writes into new tensors nothing reads go."""
    def f(x):
        kept = torch.zeros(3)
        kept[0] = x.sum()
        x.view(3, 1).add_(1)
        x.clone().add_(1)
        unread = torch.zeros(4)
        unread[1] = 2.0
        return kept * 2

    gm = graph_of(f, torch.ones(3))
    drop_dead_code(gm.graph)
    gm.recompile()
    writes = [n for n in gm.graph.nodes if n.target in ("add_",) or "setitem" in str(n.target)]
    assert len(writes) == 2 and sum(n.target is torch.zeros for n in gm.graph.nodes) == 1
    x, y = torch.ones(3), torch.ones(3)
    torch.testing.assert_close(gm(x)[0], f(y))
    torch.testing.assert_close(x, y)
