"""Attention written out by hand (matmul, softmax, matmul) is recognised as attention."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import astraea
from astraea.passes.written_attention import collapse_written_attention
from tests.contract import check_generated
from tests.generated import Knobs

@pytest.mark.parametrize("joint", [None, "dual", "single"])
def test_written_attention_goes_sparse_and_keeps_the_contract(joint):
    """The generated DiT with attention written out: every block sparse, exact at budget 1.0,
    and the per-block contract at budgets below 1 (self-, cross- and joint attention)."""
    check_generated(Knobs(written_attention=True, joint=joint))


class Written(nn.Module):
    """One attention in a given hand-written form, on [B, H, N, d]."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, bias):
        d = q.shape[-1]
        if self.form == "scaled":
            return torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(d)), dim=-1) @ v
        if self.form == "divided_masked_dropout":
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
            return F.dropout(s.softmax(-1).float(), p=0.0) @ v
        if self.form == "mT_unscaled":
            return (q @ k.mT).softmax(-1) @ v
        if self.form == "returns_map":  # the map is used outside the pattern: left alone
            p = (q @ k.mT).softmax(-1)
            return p @ v, p
        if self.form == "scaled_after_bias":  # (qk + bias) * c is not SDPA's qk * c + bias
            return ((q @ k.mT + bias) * 0.5).softmax(-1) @ v
        raise ValueError(self.form)


@pytest.mark.parametrize("form, collapsed", [
    ("scaled", 1), ("divided_masked_dropout", 1), ("mT_unscaled", 1), ("returns_map", 0), ("scaled_after_bias", 0),
])
def test_forms_collapse_into_sdpa_with_the_same_values(form, collapsed):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 1, 1, 7, generator=g)
    module = Written(form)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, collapse_written_attention(gm)))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend)(q, k, v, bias)
    gm, found = graphs[0]
    assert found == collapsed
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == collapsed
    assert not collapsed or not [n for n in gm.graph.nodes if n.target in (torch.softmax, "softmax")]
    torch.testing.assert_close(out, module(q, k, v, bias), rtol=1e-5, atol=1e-5)
