"""Factorised attention on a flat stream (Open-Sora's STDiT and research code like it): the
residual stream is [B, T * S, C], each spatial layer regroups it as `(b t) s c` and each temporal
layer as `(b s) t c`. Its tokens are read as (frame, position) pairs; every frame selects the
same positions, so both regroupings of the selected rows are plain reshapes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import astraea
from tests.contract import ContractChecker, check_sparse_model

FRAMES, POSITIONS, WIDTH = 3, 8, 32


class Layer(nn.Module):
    """A spatial or temporal STDiT layer: adaLN-modulated attention within a frame or across
    frames, then a gated feed-forward on the flat stream."""

    def __init__(self, temporal: bool, einops: bool):
        super().__init__()
        self.temporal, self.einops = temporal, einops
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.ff = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(approximate="tanh"), nn.Linear(2 * WIDTH, WIDTH))
        self.mod = nn.Linear(WIDTH, 3 * WIDTH)

    def regroup(self, x):
        b = x.shape[0]
        if self.einops:
            return rearrange(x, "b (t s) c -> (b s) t c" if self.temporal else "b (t s) c -> (b t) s c", t=FRAMES)
        x = x.view(b, FRAMES, POSITIONS, WIDTH)
        return (x.transpose(1, 2) if self.temporal else x).reshape(-1, POSITIONS if not self.temporal else FRAMES, WIDTH)

    def back(self, x, b):
        if self.einops:
            pattern = "(b s) t c -> b (t s) c" if self.temporal else "(b t) s c -> b (t s) c"
            return rearrange(x, pattern, b=b)
        if self.temporal:
            return x.view(b, POSITIONS, FRAMES, WIDTH).transpose(1, 2).reshape(b, -1, WIDTH)
        return x.reshape(b, -1, WIDTH)

    def forward(self, x, c):
        shift, scale, gate = self.mod(c)[:, None].chunk(3, dim=-1)
        h = self.regroup(self.norm(x) * (1 + scale) + shift)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.back(self.out(a), x.shape[0])
        return x + gate * self.ff(self.norm(x))


class STDiT(nn.Module):
    def __init__(self, einops: bool, pairs: int = 2):
        super().__init__()
        self.embed, self.time, self.head = nn.Linear(4, WIDTH), nn.Linear(1, WIDTH), nn.Linear(WIDTH, 4)
        self.blocks = nn.ModuleList([Layer(i % 2 == 1, einops) for i in range(2 * pairs)])

    def forward(self, x, t):
        c = F.silu(self.time(t[:, None] / 1000))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)


def inputs_for(batch: int):
    def inputs(step: int):
        g = torch.Generator().manual_seed(step)
        return torch.randn(batch, FRAMES * POSITIONS, 4, generator=g), torch.full((batch,), 900.0 - 100 * step)
    return inputs


@pytest.mark.parametrize("einops", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_each_spatial_and_temporal_pair_goes_sparse_and_keeps_the_contract(einops, batch):
    torch.manual_seed(0)
    model = STDiT(einops).eval()
    report = astraea.explain(model, *inputs_for(batch)(0))
    assert report.whole_positions and report.token_grid == (FRAMES, POSITIONS), str(report)
    assert f"selects whole positions, the same in every one of the {FRAMES} frames" in str(report)
    check_sparse_model(model, inputs_for(batch), 2)


def test_every_frame_selects_the_same_positions_whatever_group_is_asked():
    torch.manual_seed(0)
    model, inputs = STDiT(einops=True).eval(), inputs_for(1)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.5, 0.3], group="token")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        compiled(*inputs(0))
        checker = be.runners[0].graph_fn = ContractChecker(be.runners[0])
        for step in (1, 2):
            compiled(*inputs(step))
    torch._dynamo.reset()
    for indices in checker.selected:
        for idx in indices:
            frames = idx[0].view(FRAMES, -1)
            assert (frames % POSITIONS == frames[0] % POSITIONS).all() and (frames // POSITIONS == torch.arange(FRAMES)[:, None]).all()


def test_inductor_lowering_and_skips_equal_the_eager_lowering():
    torch.manual_seed(0)
    model, inputs = STDiT(einops=True).eval(), inputs_for(2)
    outs = {}
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.5, 0.0, 0.25, 0.75], lowering=lowering)
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            outs[lowering] = [compiled(*inputs(step)) for step in range(5)]
    torch._dynamo.reset()
    for got, expected in zip(outs["inductor"], outs["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
