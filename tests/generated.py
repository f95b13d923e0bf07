"""DiT-like modules generated from a few knobs, for property tests of the analysis and rewrite.

The knobs cover what real video DiTs vary: depth, width, heads, cross-attention, adaLN
modulation, gated residuals, RoPE tables (with a batch dim or without, as CogVideoX and
HunyuanVideo keep them), fused or separate q/k/v, joint text-video attention (`joint`:
"dual" keeps separate text weights and one attention over the concatenation, as CogVideoX and
HunyuanVideo's double blocks; "single" runs one block over the concatenated tokens, as
HunyuanVideo's single blocks; "once" joins the text to the video once before the blocks, which
all run over the joint tokens until the video is split out after the last, as the original
HunyuanVideo and Flux-style code write their single-stream stretch), text before or after the video, attention through SDPA, flex_attention or
written out by hand (matmul, softmax, matmul), or linear (a key/value summary over every
token); heads split and merged with einops, as research code writes them; per-frame adaLN tables
applied to the tokens split into frames (diffusion forcing); and `mixing` puts an
op that is not token-wise into one block (a reduction over tokens, a roll along tokens, a
linear map over the token axis, a cumulative sum), which astraea must leave dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from torch import nn

MIXING = (None, "mean", "roll", "token_linear", "cumsum")


@dataclass(frozen=True)
class Knobs:
    depth: int = 2
    width: int = 32
    heads: int = 2
    tokens: int = 24
    cross: bool = True
    modulation: bool = True
    gated: bool = True
    rope: bool = True
    rope_rows: bool = False  # RoPE tables as [N, d], not [1, 1, N, d]
    fused_qkv: bool = False
    mixing: str | None = None
    mixing_block: int = 0
    joint: str | None = None  # None, "dual", "single" or "once" (RoPE then off: its tables cover the video)
    text_first: bool = False
    written_attention: bool = False  # softmax(q k^T * scale) v written out, as research code does (einsum with einops)
    score_mask: bool = False  # written or flex attention: the last key masked (on the scores, or by a flex block mask)
    flex: bool = False  # attention through flex_attention, as diffusers' "flex" backend calls it
    linear_attention: bool = False  # self-attention as relu(q) (relu(k)^T v), normalised (Sana-Video)
    einops: bool = False  # heads split (fused q/k/v too) and merged by einops.rearrange
    frames: int = 1  # > 1: per-frame adaLN tables, applied to the tokens split into frames (no joint)
    grouped_query: bool = False  # self-attention with half the key/value heads (SDPA's enable_gqa), where heads are even
    # > 0: factorised attention on a flat stream of that many frames (STDiT): even blocks attend
    # within each frame, odd ones across frames at each position (no joint text, RoPE or frame tables)
    factorised: int = 0
    wrapped: str | None = None  # "checkpoint": every block run under activation checkpointing, as research
    # code often leaves it at inference; "region": the blocks' forward marked `nested_compile_region`


class Block(nn.Module):
    def __init__(self, k: Knobs, index: int):
        super().__init__()
        w = k.width
        self.k, self.index = k, index
        self.norm1 = nn.LayerNorm(w, elementwise_affine=not k.modulation)
        self.norm2 = nn.LayerNorm(w)
        self.norm3 = nn.LayerNorm(w, elementwise_affine=not k.modulation)
        self.qkv = nn.Linear(w, 3 * w) if k.fused_qkv else None
        self.to_q, self.to_k, self.to_v = (None, None, None) if k.fused_qkv else (nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w))
        self.out = nn.Linear(w, w)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(w, w), nn.Linear(w if k.joint == "once" else 16, 2 * w), nn.Linear(w, w)
        self.ff = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(approximate="tanh"), nn.Linear(2 * w, w))
        self.mod = nn.Parameter(torch.randn(1, 6, w) / w**0.5)
        self.frame_mod = nn.Parameter(torch.randn(1, k.frames, 6, w) / w**0.5) if k.frames > 1 else None
        self.token_mix = nn.Parameter(torch.randn(k.tokens, k.tokens) / k.tokens)
        if k.joint == "dual":
            self.txt_norm, self.txt_qkv, self.txt_out = nn.LayerNorm(w), nn.Linear(w, 3 * w), nn.Linear(w, w)
            self.txt_ff = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(approximate="tanh"), nn.Linear(2 * w, w))

    def attend(self, q, k, v):
        if self.k.flex:
            if not self.k.score_mask:
                return flex_attention(q, k, v)
            keep = (torch.arange(k.shape[-2], device=k.device) < k.shape[-2] - 1).expand(*q.shape[:-1], k.shape[-2])
            mask = create_block_mask(lambda b, h, i, j: keep[b, h, i, j], q.shape[0], q.shape[1], q.shape[-2],
                                     k.shape[-2], device=q.device)
            return flex_attention(q, k, v, block_mask=mask)
        if not self.k.written_attention:
            return F.scaled_dot_product_attention(q, k, v)
        if self.k.einops:  # as einops code writes it: products by torch.einsum
            scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        else:
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if self.k.score_mask:
            padding = torch.arange(k.shape[-2], device=k.device) == k.shape[-2] - 1
            scores = scores.masked_fill(padding, float("-inf") if self.k.einops else -1e9)
        if self.k.einops:
            return torch.einsum("b h i j, b h j d -> b h i d", scores.softmax(dim=-1), v)
        return scores.softmax(dim=-1) @ v

    def self_attend(self, q, k, v):
        if self.k.grouped_query and q.shape[1] % 2 == 0 and not (self.k.linear_attention or self.k.written_attention):
            # half the key/value heads, each shared by two query heads
            return F.scaled_dot_product_attention(q, k[:, ::2], v[:, ::2], enable_gqa=True)
        if not self.k.linear_attention:
            return self.attend(q, k, v)
        q, k = F.relu(q), F.relu(k)
        summary = k.transpose(-2, -1) @ v  # [B, H, d, d]: every token's keys with its values
        norm = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # [B, H, N, 1]
        return (q @ summary) / (norm + 1e-6)

    def heads(self, x):
        if self.k.einops:
            return rearrange(x, "b n (h d) -> b h n d", h=self.k.heads)
        b, n, _ = x.shape
        return x.view(b, n, self.k.heads, -1).transpose(1, 2)

    def merged(self, a):
        """[B, H, N, d] -> [B, N, H * d]"""
        return rearrange(a, "b h n d -> b n (h d)") if self.k.einops else a.transpose(1, 2).flatten(2)

    def forward(self, x, temb, ctx, cos, sin):
        if self.k.joint == "dual":
            return self.dual(x, ctx, temb, cos, sin)
        if self.k.joint == "single":
            return self.single(x, ctx, temb, cos, sin)
        k = self.k
        if k.frames > 1:  # each [B, F, 1, C]: a table per frame (diffusion forcing)
            shift, scale, gate, c_shift, c_scale, c_gate = (self.frame_mod + temb[:, None, None]).chunk(6, dim=2)
        else:
            shift, scale, gate, c_shift, c_scale, c_gate = (self.mod + temb[:, None]).chunk(6, dim=1)
        h = self.norm1(x)
        if k.modulation:
            h = self.framed(h, lambda f: f * (1 + scale) + shift)
        q, key, v = self.qkv_heads(self.regrouped(h) if k.factorised else h)
        if k.joint != "once":
            q, key = self.rope(q, cos, sin), self.rope(key, cos, sin)
        a = self.merged(self.self_attend(q, key, v))
        a = self.out(self.regrouped(a, x.shape[0]) if k.factorised else a)
        x = x + (self.framed(a, lambda f: f * gate) if k.gated else a)
        if k.mixing and self.index == k.mixing_block:
            x = self.mix(x)
        if k.cross:
            cq = self.heads(self.cross_q(self.norm2(x)))
            ck, cv = (self.heads(t) for t in self.cross_kv(ctx).chunk(2, dim=-1))
            x = x + self.cross_out(self.merged(self.attend(cq, ck, cv)))
        h = self.norm3(x)
        if k.modulation:
            h = self.framed(h, lambda f: f * (1 + c_scale) + c_shift)
        f = self.ff(h)
        return x + (self.framed(f, lambda t: t * c_gate) if k.gated else f)

    def regrouped(self, x, batch: int | None = None):
        """[B, F * S, C] as [B * F, S, C] (attention within frames: even blocks) or [B * S, F, C]
        (across frames: odd blocks); with `batch` (B), back."""
        across, frames = self.index % 2 == 1, self.k.factorised
        flat, grouped = "b (f s) c", "(b s) f c" if across else "(b f) s c"
        if self.k.einops:
            return rearrange(x, f"{grouped} -> {flat}", b=batch) if batch else rearrange(x, f"{flat} -> {grouped}", f=frames)
        x = x.unflatten(0, (batch, -1)) if batch else x.unflatten(1, (frames, -1))
        x = x.transpose(1, 2) if across else x
        return x.flatten(1, 2) if batch else x.flatten(0, 1)

    def framed(self, x, fn):
        """fn of x split into frames [B, F, N / F, C], back as [B, N, C]; fn of x with one frame."""
        if self.k.frames == 1:
            return fn(x)
        return fn(x.unflatten(1, (self.k.frames, -1))).flatten(1, 2)

    def qkv_heads(self, h):
        if self.k.fused_qkv and self.k.einops:
            return tuple(rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.k.heads))
        if self.k.fused_qkv:
            return tuple(self.heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        return self.heads(self.to_q(h)), self.heads(self.to_k(h)), self.heads(self.to_v(h))

    def rope(self, q, cos, sin):
        return q * cos + q.flip(-1) * sin if self.k.rope else q

    def joined(self, video, text, dim):
        return torch.cat([text, video] if self.k.text_first else [video, text], dim=dim)

    def parted(self, joint, n, dim):
        """(video, text) parts of a joint tensor."""
        t = joint.shape[dim] - n
        if self.k.text_first:
            text, video = joint.split([t, n], dim=dim)
        else:
            video, text = joint.split([n, t], dim=dim)
        return video, text

    def dual(self, x, txt, temb, cos, sin):
        """Separate weights for text and video, one attention over both."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.mod + temb[:, None]).chunk(6, dim=1)
        h = self.norm1(x)
        if self.k.modulation:
            h = h * (1 + scale) + shift
        q, key, v = self.qkv_heads(h)
        q, key = self.rope(q, cos, sin), self.rope(key, cos, sin)
        tq, tk, tv = (self.heads(t) for t in self.txt_qkv(self.txt_norm(txt)).chunk(3, dim=-1))
        a = self.self_attend(self.joined(q, tq, 2), self.joined(key, tk, 2), self.joined(v, tv, 2))
        a, ta = self.parted(self.merged(a), x.shape[1], 1)
        x = x + (self.out(a) * gate if self.k.gated else self.out(a))
        if self.k.mixing and self.index == self.k.mixing_block:
            x = self.mix(x)
        txt = txt + self.txt_out(ta)
        h = self.norm3(x)
        if self.k.modulation:
            h = h * (1 + c_scale) + c_shift
        f = self.ff(h)
        return x + (f * c_gate if self.k.gated else f), txt + self.txt_ff(txt)

    def single(self, x, txt, temb, cos, sin):
        """One block over the concatenated tokens; RoPE on the video part only."""
        n = x.shape[1]
        shift, scale, gate, c_shift, c_scale, c_gate = (self.mod + temb[:, None]).chunk(6, dim=1)
        joint = self.joined(x, txt, 1)
        h = self.norm1(joint)
        if self.k.modulation:
            h = h * (1 + scale) + shift
        q, key, v = self.qkv_heads(h)
        (qv, qt), (kv, kt) = self.parted(q, n, 2), self.parted(key, n, 2)
        q, key = self.joined(self.rope(qv, cos, sin), qt, 2), self.joined(self.rope(kv, cos, sin), kt, 2)
        a = self.out(self.merged(self.self_attend(q, key, v)))
        joint = joint + (a * gate if self.k.gated else a)
        h = self.norm3(joint)
        if self.k.modulation:
            h = h * (1 + c_scale) + c_shift
        f = self.ff(h)
        joint = joint + (f * c_gate if self.k.gated else f)
        x, txt = self.parted(joint, n, 1)
        if self.k.mixing and self.index == self.k.mixing_block:
            x = self.mix(x)
        return x, txt

    def mix(self, x):
        kind = self.k.mixing
        if kind == "mean":
            return x + x.mean(dim=1, keepdim=True)
        if kind == "roll":
            return torch.roll(x, 1, dims=1)
        if kind == "token_linear":
            return x + torch.matmul(x.transpose(1, 2), self.token_mix).transpose(1, 2)  # `@` is linear attention's
        return x.cumsum(dim=1) / x.shape[1]


class RegionBlock(Block):
    forward = torch.compiler.nested_compile_region(Block.forward)


class GeneratedDiT(nn.Module):
    def __init__(self, k: Knobs, channels: int = 4):
        super().__init__()
        self.k = k
        self.proj_in = nn.Linear(channels, k.width)
        self.time = nn.Linear(16, k.width)
        self.txt_in = nn.Linear(16, k.width) if k.joint else None
        self.blocks = nn.ModuleList((RegionBlock if k.wrapped == "region" else Block)(k, i) for i in range(k.depth))
        self.norm_out = nn.LayerNorm(k.width)
        self.proj_out = nn.Linear(k.width, channels)
        d = k.width // k.heads
        angles = torch.arange(k.tokens)[:, None] * torch.linspace(0.1, 1.0, d)[None]
        lead = () if k.rope_rows else (None, None)
        self.register_buffer("cos", angles.cos()[lead])
        self.register_buffer("sin", angles.sin()[lead])

    def forward(self, latent, timestep, context):
        freqs = torch.arange(8, device=latent.device) / 8
        t = timestep[:, None] * torch.exp(-freqs)[None]
        temb = self.time(torch.cat([t.sin(), t.cos()], dim=-1))
        x = self.proj_in(latent)
        if self.k.joint:
            context = self.txt_in(context)
        n = x.shape[1]
        if self.k.joint == "once":
            x = torch.cat([context, x] if self.k.text_first else [x, context], dim=1)
        for block in self.blocks:
            if self.k.wrapped == "checkpoint":
                x = torch.utils.checkpoint.checkpoint(block, x, temb, context, self.cos, self.sin, use_reentrant=False)
            else:
                x = block(x, temb, context, self.cos, self.sin)
            if self.k.joint in ("dual", "single"):
                x, context = x
        if self.k.joint == "once":
            x = x[:, -n:] if self.k.text_first else x[:, :n]
        return self.proj_out(self.norm_out(x))


def example_inputs(k: Knobs, step: int = 0, seed: int = 0, context_tokens: int = 5):
    """(latent, timestep, context) of one call at denoising step `step`."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, k.tokens, 4, generator=g) + 0.1 * step
    return latent, torch.tensor([1000.0 - 100 * step]), torch.randn(1, context_tokens, 16, generator=g)



class BlockStack(nn.Module):
    """A minimal DiT around hand-written blocks, each called as `block(x, temb)` (under activation
    checkpointing where `checkpointed`): latents [B, N, 4] to the blocks' width, a timestep
    embedding, the blocks, and back."""

    def __init__(self, blocks, width: int, checkpointed: bool = False):
        super().__init__()
        self.inp, self.time, self.outp = nn.Linear(4, width), nn.Linear(1, width), nn.Linear(width, 4)
        self.blocks, self.checkpointed = nn.ModuleList(blocks), checkpointed

    def forward(self, latent, timestep):
        x, temb = self.inp(latent), self.time(timestep[:, None])
        for block in self.blocks:
            if self.checkpointed:
                x = torch.utils.checkpoint.checkpoint(block, x, temb, use_reentrant=False)
            else:
                x = block(x, temb)
        return self.outp(x)


def stack_inputs(tokens: int, batch: int = 2, steps: int = 3):
    """`step -> (latent, timestep)` for a `BlockStack`: fresh latents per step, the time going down."""
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(batch, tokens, 4, generator=g) for _ in range(steps)]
    return lambda step: (latents[step], torch.full((batch,), 900.0 - 300 * step))
