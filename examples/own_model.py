"""astraea on a video DiT written by hand, as research code writes one (not a diffusers class).

    python examples/own_model.py                 # explain, then dense against astraea on a CPU, in seconds
    python examples/own_model.py --budget 0.3

The model below has what research DiTs have: patches and heads laid out with einops, adaLN
modulation from the timestep, text joined to the video for one attention (dual-stream, as
HunyuanVideo's double blocks), RoPE applied as complex numbers. Nothing tells astraea where its
blocks are: `astraea.explain` finds them in the traced graph. The script samples a few
flow-matching Euler steps dense and with astraea at one budget, and prints how many tokens each
block call recomputed and how far the result is from dense. Needs einops (`pip install einops`).
Random weights: the distance says the machinery works, not what a trained model would score.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import astraea


def rope(x, freqs):
    """x [B, H, N, d] rotated by the complex table freqs [N, d / 2]."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs).flatten(-2).type_as(x)


class DualBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.mod, self.text_mod = nn.Linear(width, 6 * width), nn.Linear(width, 6 * width)
        self.qkv, self.text_qkv = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)
        self.out, self.text_out = nn.Linear(width, width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.text_mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x, text, temb, freqs):
        n = x.shape[1]
        shift, scale, gate, shift2, scale2, gate2 = self.mod(temb)[:, None].chunk(6, dim=-1)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.text_mod(temb)[:, None].chunk(6, dim=-1)
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        th = F.layer_norm(text, text.shape[-1:]) * (1 + t_scale) + t_shift
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        tq, tk, tv = rearrange(self.text_qkv(th), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k = rope(q, freqs), rope(k, freqs)
        a = F.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2))
        a = rearrange(a, "b h n d -> b n (h d)")
        x = x + gate * self.out(a[:, :n])
        text = text + t_gate * self.text_out(a[:, n:])
        x = x + gate2 * self.mlp(F.layer_norm(x, x.shape[-1:]) * (1 + scale2) + shift2)
        text = text + t_gate2 * self.text_mlp(F.layer_norm(text, text.shape[-1:]) * (1 + t_scale2) + t_shift2)
        return x, text


class ResearchDiT(nn.Module):
    """[B, C, F, H, W] latent, a timestep per sample and [B, L, text_dim] text -> velocity."""

    def __init__(self, channels=4, width=64, heads=4, depth=4, text_dim=32, patch=2, grid=(4, 8, 8)):
        super().__init__()
        self.patch, self.grid = patch, grid
        self.proj_in = nn.Linear(channels * patch * patch, width)
        self.text_in = nn.Linear(text_dim, width)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DualBlock(width, heads) for _ in range(depth))
        self.proj_out = nn.Linear(width, channels * patch * patch)
        tokens = grid[0] * (grid[1] // patch) * (grid[2] // patch)
        angles = torch.arange(tokens)[:, None] * torch.logspace(0, -3, width // heads // 2)[None]
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, latent, timestep, text):
        f, h, w = latent.shape[2:]
        x = self.proj_in(rearrange(latent, "b c f (h p) (w q) -> b (f h w) (c p q)", p=self.patch, q=self.patch))
        half = torch.exp(-math.log(10000) * torch.arange(32, device=latent.device) / 32)
        temb = self.time(torch.cat([(timestep[:, None] * half).sin(), (timestep[:, None] * half).cos()], -1))
        text = self.text_in(text)
        for block in self.blocks:
            x, text = block(x, text, temb, self.freqs)
        return rearrange(self.proj_out(F.layer_norm(x, x.shape[-1:])), "b (f h w) (c p q) -> b c f (h p) (w q)",
                         f=f, h=h // self.patch, p=self.patch, q=self.patch)


@torch.no_grad()
def sample(model, noise, text, steps):
    """Flow-matching Euler from t = 1 to 0 (timesteps 1000 .. 0), the velocity predicted by `model`."""
    x, ts = noise, torch.linspace(1.0, 0.0, steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, (1000 * t).expand(x.shape[0]), text)
    return x


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5, help="share of tokens each block recomputes per step")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = ResearchDiT().eval()
    noise, text = torch.randn(1, 4, *model.grid), torch.randn(1, 8, 32)
    print(astraea.explain(model, noise, torch.tensor([1000.0]), text))
    dense = sample(model, noise, text, args.steps)
    schedule = [1.0] + [args.budget] * (args.steps - 1)  # the first step dense: every cache filled
    be = astraea.backend(schedule=schedule)
    sparse = sample(torch.compile(model, backend=be), noise, text, args.steps)
    tokens = [r.tokens for r in be.runners[0].records]
    distance = (torch.linalg.norm(sparse - dense) / torch.linalg.norm(dense)).item()
    print(f"tokens recomputed per step: {tokens} of {be.reports[0].num_tokens}")
    print(f"astraea at budget {args.budget} against dense: relative distance {distance:.3f}")
    return {"tokens": tokens, "num_tokens": be.reports[0].num_tokens, "distance": distance,
            "sparse_blocks": be.reports[0].num_sparse_blocks, "blocks": len(model.blocks)}


if __name__ == "__main__":
    main()
