"""Blocks on a stream that carries small segments joined to the video tokens from block to block:
text (or registers) concatenated once before single-stream blocks, as research code writes them
(the original HunyuanVideo and Flux-style MMDiTs: dual-stream blocks, then one concatenation,
then single-stream blocks over the joint tokens). Each block is its own sparse block, its video
segment merged with the cache and the small segments computed in full; they were one block
spanning every such layer before, all but its last layer on every token."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.contract import check_sparse_model


class _Single(nn.Module):
    """A single-stream block over whatever tokens it is given."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mod, self.norm = nn.Linear(width, 2 * width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, temb):
        b, n, w = x.shape
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm(x) * (1 + scale) + shift).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.ff(x)


class _Dual(nn.Module):
    """Separate weights for video and text, one attention over both (text after the video)."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.video_qkv, self.text_qkv = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)
        self.video_out, self.text_out = nn.Linear(width, width), nn.Linear(width, width)
        self.video_ff, self.mod = nn.Linear(width, width), nn.Linear(width, 2 * width)

    def forward(self, x, txt, temb):
        b, n, w = x.shape
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        joint = torch.cat([self.video_qkv(x * (1 + scale) + shift), self.text_qkv(txt)], dim=1)
        q, k, v = joint.view(b, -1, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, w)
        x = x + self.video_out(a[:, :n])
        return x + self.video_ff(x), txt + self.text_out(a[:, n:])


class _JointStreamDiT(nn.Module):
    """`registers` learned tokens before the video, or `dual` dual-stream blocks and text joined
    after the video once, then `single` single-stream blocks over the joint tokens."""

    def __init__(self, kind: str, dual: int = 2, single: int = 2, width: int = 32, registers: int = 4):
        super().__init__()
        self.kind, self.registers = kind, registers
        self.inp, self.time, self.txt, self.outp = (nn.Linear(4, width), nn.Linear(1, width), nn.Linear(16, width),
                                                    nn.Linear(width, 4))
        self.reg = nn.Parameter(torch.randn(1, registers, width))
        self.dual = nn.ModuleList(_Dual(width) for _ in range(dual if kind == "text" else 0))
        self.single = nn.ModuleList(_Single(width) for _ in range(single))

    def forward(self, latent, timestep, context):
        x, temb, txt = self.inp(latent), self.time(timestep[:, None]), self.txt(context)
        n = x.shape[1]
        for block in self.dual:
            x, txt = block(x, txt, temb)
        if self.kind == "registers":
            x = torch.cat([self.reg.expand(x.shape[0], -1, -1), x], dim=1)
        else:
            x = torch.cat([x, txt], dim=1)
        for block in self.single:
            x = block(x, temb)
        return self.outp(x[:, self.registers:] if self.kind == "registers" else x[:, :n])


@pytest.mark.parametrize("kind, blocks", [("registers", 2), ("text", 4)])
def test_each_layer_on_a_joint_stream_is_its_own_sparse_block(kind, blocks):
    """Registers before the video, or text after it joined once after two dual-stream blocks:
    every layer a sparse block (the registers' model read 1 of 1 before, the text one 3 of 3),
    exact at budget 1.0, and the contract below 1 on the video segment, per sample."""
    torch.manual_seed(0)
    model = _JointStreamDiT(kind).eval()
    g = torch.Generator().manual_seed(1)
    latents = [torch.randn(2, 24, 4, generator=g) for _ in range(3)]
    context = torch.randn(2, 5, 16, generator=g)
    check_sparse_model(model, lambda step: (latents[step], torch.tensor([900.0 - 300 * step] * 2), context), blocks)


@pytest.mark.parametrize("kind", ["registers", "text"])
def test_a_skipped_step_reuses_the_video_segment_and_computes_no_attention(kind):
    """At budget 0 each block adds its cache to the video segment of its input; the small
    segments only feed the blocks' attention and are dropped at the end, so the skip graph holds
    no attention. The same latent at the next step then gives the dense step's output again (the
    stream's start does not depend on the timestep in this model, and each block's cache is what
    it added to that same input)."""
    import astraea
    from tests.contract import whole_graph
    from tests.test_skip import recording

    torch.manual_seed(0)
    model = _JointStreamDiT(kind).eval()
    g = torch.Generator().manual_seed(1)
    latent, context = torch.randn(2, 24, 4, generator=g), torch.randn(2, 5, 16, generator=g)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.0], skip="blocks")
    compiled = torch.compile(model, backend=be)
    seen = {}
    with torch.no_grad():
        dense = compiled(latent, torch.tensor([900.0] * 2), context)
        recording(be.runners[0], seen)
        skipped = compiled(latent, torch.tensor([600.0] * 2), context)
    assert [r.tokens for r in be.runners[0].records] == [24, 0]
    torch.testing.assert_close(skipped, dense, atol=1e-5, rtol=1e-5)
    nodes = whole_graph(seen["graph"]).graph.nodes
    attention = [n for n in nodes if n.op == "call_function" and "attention" in str(n.target)]
    assert not attention, attention
