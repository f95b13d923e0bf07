"""Concatenations drop their empty parts: the original Wan's RoPE, applied per sample to the first
`seq_len` tokens and joined to the empty rest (`torch.cat([rotated, x[i, seq_len:]])`), goes sparse."""

import torch
import torch.nn.functional as F
from torch import nn

from astraea.passes.empty_parts import drop_empty_parts
from tests.contract import check_sparse_model
from tests.generated import BlockStack, stack_inputs
from tests.graphs import graph_of

WIDTH, HEADS, TOKENS = 32, 2, 12


def rope_per_sample(x, angles):
    """Wan's `rope_apply` on [B, N, H, D]: each sample's first `seq_len` tokens (here every token)
    rotated in complex float64, then joined to the rest."""
    out = []
    for i in range(x.shape[0]):
        seq_len = x.shape[1]
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, HEADS, -1, 2))
        x_i = torch.view_as_real(x_i * torch.polar(torch.ones_like(angles), angles)).flatten(2)
        out.append(torch.cat([x_i, x[i, seq_len:]]))
    return torch.stack(out).float()


class WanLikeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.mod, self.ff = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(WIDTH, WIDTH)
        d = WIDTH // HEADS
        self.register_buffer("angles", torch.arange(TOKENS)[:, None, None] * torch.linspace(0.1, 1, d // 2)[None, None])

    def forward(self, x, temb):
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        h = F.layer_norm(x, (WIDTH,)) * (1 + scale) + shift
        b, n, _ = h.shape
        q, k, v = (f(h).view(b, n, HEADS, -1) for f in (self.q, self.k, self.v))
        q, k = rope_per_sample(q, self.angles), rope_per_sample(k, self.angles)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.o(a.transpose(1, 2).flatten(2))
        return x + self.ff(F.layer_norm(x, (WIDTH,)))


def test_wan_s_per_sample_rope_goes_sparse_and_keeps_the_contract():
    """Dense without the pass: the empty tail is an index along the token axis the rules cannot place."""
    torch.manual_seed(0)
    check_sparse_model(BlockStack([WanLikeBlock(), WanLikeBlock()], WIDTH).eval(), stack_inputs(TOKENS), 2)


def test_the_graph_computes_the_same_without_the_empty_parts():
    x, angles = torch.randn(2, TOKENS, HEADS, WIDTH // HEADS), torch.rand(TOKENS, 1, WIDTH // HEADS // 2)
    gm = graph_of(rope_per_sample, x, angles)
    expected = gm(x, angles)
    assert drop_empty_parts(gm) == 2  # one per sample
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert all(len(n.args[0]) == 1 for n in cats)
    torch.testing.assert_close(gm(x, angles), expected, rtol=0, atol=0)


def test_an_empty_part_that_widens_the_dtype_stays():
    """`torch.cat` promotes over every part, empty or not: dropping a float64 empty part would
    change a float32 result's dtype, so that concatenation is left as written."""

    def fn(x):
        return torch.cat([x, x[:, :0].double()], dim=1)

    gm = graph_of(fn, torch.randn(2, 4))
    assert drop_empty_parts(gm) == 0
    assert gm(torch.randn(2, 4))[0].dtype == torch.float64
