"""Small models of four families, with random weights, and a CFG sampling loop.

Each family is the real diffusers class at a tiny config, so the graphs the tests see are
the graphs users' models give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanTransformer3DModel,
)

import astraea.parallel


@dataclass
class Family:
    """A model plus how to call it: `call(model, latent, t, context)` returns the prediction."""

    name: str
    model: torch.nn.Module
    latent_shape: tuple[int, ...]
    call: Callable
    conditions: tuple  # (cond, uncond) conditioning tensors
    sparse: bool  # whether astraea makes its blocks sparse today


def wan(frames=3, size=8, layers=2, dim_head=16, heads=2, seed=0, batch=1, channels=4, text_tokens=7, ffn_dim=64) -> Family:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim_head, in_channels=channels,
        out_channels=channels, text_dim=32, freq_dim=32, ffn_dim=ffn_dim, num_layers=layers, cross_attn_norm=True,
        rope_max_seq_len=32,
    ).eval()
    cond, uncond = torch.randn(batch, text_tokens, 32), torch.zeros(batch, text_tokens, 32)

    def call(m, x, t, e):
        return m(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=e, return_dict=False)[0]

    return Family("wan", model, (batch, channels, frames, size, size), call, (cond, uncond), True)


def ltx(frames=3, size=4, layers=2, seed=0) -> Family:
    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=layers, caption_channels=32,
    ).eval()
    cond, uncond = torch.randn(1, 8, 32), torch.zeros(1, 8, 32)
    mask = torch.ones(1, 8)

    def call(m, x, t, e):
        return m(
            hidden_states=x, encoder_hidden_states=e, timestep=t.expand(x.shape[0]), encoder_attention_mask=mask,
            num_frames=frames, height=size, width=size, return_dict=False,
        )[0]

    return Family("ltx", model, (1, frames * size * size, 8), call, (cond, uncond), True)


def cogvideox(seed=0) -> Family:
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval()
    cond, uncond = torch.randn(1, 8, 32), torch.zeros(1, 8, 32)

    def call(m, x, t, e):
        return m(hidden_states=x, encoder_hidden_states=e, timestep=t.expand(x.shape[0]), return_dict=False)[0]

    return Family("cogvideox", model, (1, 3, 4, 16, 16), call, (cond, uncond), True)


def hunyuan(seed=0, double=1, single=1) -> Family:
    """`double` dual-stream blocks, then `single` single-stream blocks."""
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=double,
        num_single_layers=single, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    cond, uncond = torch.randn(1, 8, 32), torch.zeros(1, 8, 32)
    mask, pooled, guidance = torch.ones(1, 8, dtype=torch.bool), torch.randn(1, 16), torch.tensor([3.0])

    def call(m, x, t, e):
        return m(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=e, encoder_attention_mask=mask,
            pooled_projections=pooled, guidance=guidance, return_dict=False,
        )[0]

    return Family("hunyuan", model, (1, 4, 3, 16, 16), call, (cond, uncond), True)


FAMILIES = {"wan": wan, "ltx": ltx, "cogvideox": cogvideox, "hunyuan": hunyuan}


def sample(family: Family, model, steps=4, guidance=3.0, seed=0, mesh=None) -> torch.Tensor:
    """Euler flow-matching loop with classifier-free guidance: cond then uncond call per step
    (or one branch per half of the ranks of `mesh`, see `astraea.parallel.guidance`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(family.latent_shape, generator=g)
    timesteps = torch.linspace(1000, 1000 / steps, steps)
    cond, uncond = family.conditions
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            t = t.reshape(1)
            v = astraea.parallel.guidance(lambda e: family.call(model, x, t, e), cond, uncond, guidance, mesh)
            dt = (timesteps[i + 1] - t if i + 1 < steps else -t) / 1000
            x = x + dt * v
    return x
