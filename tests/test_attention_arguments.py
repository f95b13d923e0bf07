"""SDPA's options passed by position are read as the keywords they are."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import astraea
from astraea.passes.attention_arguments import name_attention_options
from tests.contract import check_sparse_model
from tests.graphs import graph_of


class PositionalBlock(nn.Module):
    """Self-attention whose options are passed by position, as research code often does."""

    def __init__(self, causal: bool):
        super().__init__()
        self.qkv, self.out, self.causal = nn.Linear(16, 48), nn.Linear(16, 16), causal

    def forward(self, x, t, mask):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, None if self.causal else mask, 0.0, self.causal)
        return x + self.out(a.transpose(1, 2).flatten(2)) * t[:, None, None]


class Stack(nn.Module):
    def __init__(self, causal: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([PositionalBlock(causal) for _ in range(2)])

    def forward(self, x, t, mask):
        for block in self.blocks:
            x = block(x, t, mask)
        return x


def inputs(step: int):
    g = torch.Generator().manual_seed(step)
    mask = torch.arange(10)[:, None] >= torch.arange(10)[None, :] - 3  # a static [N, N] mask: a table
    return torch.randn(1, 10, 16, generator=g), torch.tensor([1.0 - 0.1 * step]), mask


@pytest.mark.parametrize("causal", [False, True])
def test_positional_options_become_keywords_and_compute_the_same(causal):
    gm = graph_of(Stack(causal).eval(), *inputs(0))
    assert name_attention_options(gm) == 2
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.scaled_dot_product_attention,)]
    assert [len(n.args) for n in calls] == [3, 3]
    assert all(set(n.kwargs) == ({"is_causal"} if causal else {"attn_mask"}) for n in calls)
    torch._dynamo.reset()
    report = astraea.explain(Stack(causal).eval(), *inputs(0))
    assert report.num_sparse_blocks == (0 if causal else 2)
    assert all(b.reason and "causal" in b.reason for b in report.blocks) if causal else not report.reason


def test_a_model_passing_them_by_position_goes_sparse_and_keeps_the_contract():
    torch.manual_seed(0)
    check_sparse_model(Stack().eval(), inputs, 2)
