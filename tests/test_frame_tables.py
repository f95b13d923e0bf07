"""Per-frame modulation written on frames (diffusion forcing: each frame at its own noise level, as
SANA-WM and causal Wan research code write it) goes sparse: the tables get a row per token."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from astraea.passes.frame_tables import unsplit_frame_tables
from tests.contract import check_sparse_model
from tests.graphs import graph_of

FRAMES, PER_FRAME, WIDTH = 3, 8, 32


class FrameBlock(nn.Module):
    """A Wan-like block whose adaLN tables are per frame: [B, F, 6, C] from per-frame timesteps."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, WIDTH) / WIDTH**0.5)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.ff = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(approximate="tanh"), nn.Linear(2 * WIDTH, WIDTH))

    def frames(self, x):
        b, n, c = x.shape
        return x.unflatten(1, (FRAMES, n // FRAMES)) if self.split == "unflatten" else x.reshape(b, FRAMES, -1, c)

    def tokens(self, x):
        return x.flatten(1, 2) if self.split == "unflatten" else x.reshape(x.shape[0], -1, x.shape[-1])

    def forward(self, x, e):
        shift, scale, gate, shift2, scale2, gate2 = (self.modulation + e).chunk(6, dim=2)  # each [B, F, 1, C]
        h = self.tokens(self.frames(F.layer_norm(x, (WIDTH,))) * (1 + scale) + shift)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        a = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        x = x + self.tokens(self.frames(a) * gate)
        f = self.ff(self.tokens(self.frames(F.layer_norm(x, (WIDTH,))) * (1 + scale2) + shift2))
        return x + self.tokens(self.frames(f) * gate2)


class FrameDiT(nn.Module):
    def __init__(self, split: str, depth: int = 2):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 4)
        self.time = nn.Linear(1, 6 * WIDTH)
        self.blocks = nn.ModuleList(FrameBlock(split) for _ in range(depth))

    def forward(self, latent, timesteps):
        """latent [B, F * P, 4]; timesteps [B, F]: one noise level per frame."""
        e = self.time(timesteps[..., None] / 1000).unflatten(-1, (6, WIDTH))  # [B, F, 6, C]
        x = self.proj_in(latent)
        for block in self.blocks:
            x = block(x, e)
        return self.proj_out(x)


def _inputs(step: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, FRAMES * PER_FRAME, 4, generator=g) + 0.1 * step
    return latent, torch.tensor([[1000.0 - 100 * step - 50 * f for f in range(FRAMES)]])


@pytest.mark.parametrize("split", ["unflatten", "reshape"])
def test_per_frame_tables_go_sparse_and_keep_the_contract(split):
    torch.manual_seed(0)
    model = FrameDiT(split).eval()
    check_sparse_model(model, _inputs, 2)


def test_a_split_read_otherwise_is_left_as_written():
    """A split value that leaves the run (here: summed over the frame's tokens) keeps the run as it is."""

    def fn(x, scale):
        frames = x.unflatten(1, (FRAMES, PER_FRAME))
        return (frames * scale).flatten(1, 2), frames.sum(2)

    gm = graph_of(fn, torch.randn(1, FRAMES * PER_FRAME, 4), torch.randn(1, FRAMES, 1, 4))
    assert unsplit_frame_tables(gm) == 0
