"""A DiT built on `nn.MultiheadAttention` goes sparse: its functional call is written out around
one SDPA (self-attention, and cross-attention to text of another width); a masked call stays whole."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astraea.passes.multihead import expand_multihead_attention
from tests.contract import check_sparse_model
from tests.graphs import graph_of

WIDTH, TOKENS, TEXT_DIM = 32, 24, 16


class Block(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.mod = nn.Linear(WIDTH, 4 * WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(WIDTH, 2, kdim=TEXT_DIM, vdim=TEXT_DIM, batch_first=batch_first)
        self.ff = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x, t, text):
        shift, scale, gate, gate2 = self.mod(t)[:, None].chunk(4, dim=-1)
        h = F.layer_norm(x, (WIDTH,)) * (1 + scale) + shift
        if not self.batch_first:  # [N, B, C], as nn.MultiheadAttention takes by default
            h, text = h.transpose(0, 1), text.transpose(0, 1)
        a = self.attn(h, h, h)[0]
        c = self.cross(a, text, text, need_weights=False)[0]
        if not self.batch_first:
            a, c = a.transpose(0, 1), c.transpose(0, 1)
        x = x + gate * a + c
        return x + gate2 * self.ff(F.layer_norm(x, (WIDTH,)))


class MhaDiT(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.proj_in, self.proj_out, self.time = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 4), nn.Linear(1, WIDTH)
        self.blocks = nn.ModuleList(Block(batch_first) for _ in range(2))

    def forward(self, latent, timestep, text):
        x, t = self.proj_in(latent), self.time(timestep[:, None] / 1000)
        for block in self.blocks:
            x = block(x, t, text)
        return self.proj_out(x)


def _inputs(step: int):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, TOKENS, 4, generator=g) + 0.1 * step
    return latent, torch.tensor([1000.0 - 100 * step]), torch.randn(1, 5, TEXT_DIM, generator=g)


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_dit_on_multihead_attention_goes_sparse_and_keeps_the_contract(batch_first):
    torch.manual_seed(0)
    model = MhaDiT(batch_first).eval()
    check_sparse_model(model, _inputs, 2)


def test_a_masked_call_stays_whole():
    attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True).eval()
    mask = torch.rand(TOKENS, TOKENS) > 0.5
    gm = graph_of(lambda h: attn(h, h, h, attn_mask=mask)[0], torch.randn(1, TOKENS, WIDTH))
    assert expand_multihead_attention(gm) == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_one_selection_per_batch_is_said_as_it_is(batch):
    """nn.MultiheadAttention computes sequence-first ([N, B, C]), where the rows form indexes the
    tokens with one set for the batch: a warning names that (not factorised attention), and only
    where the batch has more than one sample."""
    import warnings

    import astraea

    torch.manual_seed(0)
    model = MhaDiT(batch_first=True).eval()
    latent, timestep, text = _inputs(0)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, backend=astraea.backend(schedule=0.5))(
            latent.expand(batch, -1, -1), timestep.expand(batch), text.expand(batch, -1, -1))
    shared = [str(w.message) for w in caught if "one set of tokens" in str(w.message)]
    assert len(shared) == (2 if batch > 1 else 0)
    assert all("sequence-first" in m and "frames" not in m for m in shared)
