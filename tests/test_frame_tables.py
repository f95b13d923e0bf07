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


class FirstFrameBlock(nn.Module):
    """Open-Sora 1.2's conditioning frame: the first frame (x_mask False) modulated with the table
    of timestep 0, the others with the step's, chosen per frame between two modulated streams."""

    def __init__(self, choose: str):
        super().__init__()
        self.choose = choose
        self.table = nn.Parameter(torch.randn(1, 2, WIDTH) / WIDTH**0.5)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.ff = nn.Linear(WIDTH, WIDTH)

    def forward(self, x, t, t0, x_mask):
        (shift, scale), (shift0, scale0) = (self.table + t).chunk(2, dim=1), (self.table + t0).chunk(2, dim=1)
        normed = F.layer_norm(x, (WIDTH,))
        h, h0 = (normed * (1 + s) + b for s, b in ((scale, shift), (scale0, shift0)))
        framed, framed0 = (y.unflatten(1, (FRAMES, -1)) for y in (h, h0))
        keep = x_mask[:, :, None, None]  # [B, F, 1, 1]
        if self.choose == "where":
            h = torch.where(keep, framed, framed0).flatten(1, 2)
        else:  # a blend by the mask as a number
            m = keep.to(h.dtype)
            h = (framed * m + framed0 * (1 - m)).flatten(1, 2)
        q, k, v = self.qkv(h).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.ff(F.layer_norm(x, (WIDTH,)))


class FirstFrameDiT(nn.Module):
    def __init__(self, choose: str, depth: int = 2):
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(4, WIDTH), nn.Linear(WIDTH, 4)
        self.time = nn.Linear(1, WIDTH)
        self.blocks = nn.ModuleList(FirstFrameBlock(choose) for _ in range(depth))

    def forward(self, latent, timestep):
        x_mask = torch.arange(FRAMES, device=latent.device).expand(latent.shape[0], -1) > 0
        t = self.time(timestep[:, None, None] / 1000)
        t0 = self.time(torch.zeros_like(timestep)[:, None, None])
        x = self.proj_in(latent)
        for block in self.blocks:
            x = block(x, t, t0, x_mask)
        return self.proj_out(x)


@pytest.mark.parametrize("choose", ["where", "blend"])
def test_streams_chosen_per_frame_go_sparse_selecting_any_tokens_per_sample(choose):
    """Two token streams split into frames and combined per frame are rewritten on the unsplit
    tokens: sparse and exact, each sample selecting its own tokens. Without the pass's joining of a
    second split the stream read as positions folded with frames: the same positions in every frame,
    one set for the whole batch."""
    import astraea

    def inputs(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(2, FRAMES * PER_FRAME, 4, generator=g), torch.full((2,), 1000.0 - 100 * step)

    torch.manual_seed(0)
    model = FirstFrameDiT(choose).eval()
    check_sparse_model(model, inputs, 2)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.5])
    with torch.no_grad():
        torch.compile(model, backend=be)(*inputs(0))
    assert not be.reports[0].whole_positions
    assert [b.samples for b in be.runners[0].blocks] == [2, 2]
