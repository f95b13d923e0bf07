"""Cross-attention regrouped per frame into the batch, as audio- and face-driven video models
write it (each frame's tokens attend to that frame's own conditioning tokens: Wan-Animate's face
adapter, per-frame audio in talking-head research code). The analysis now reads it as one
attention masked to each query's frame (`passes/frame_attention.py`); a regrouping that is not
by frame is left as it was."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import astraea
from tests.contract import check_sparse_model

WIDTH, HEADS, FRAMES, PER_FRAME, AUDIO = 32, 2, 3, 8, 4


class AudioBlock(nn.Module):
    """Self-attention, then each frame's tokens attend to that frame's audio tokens, then an MLP.
    `by_frame=False` regroups the tokens by position instead (`(S/T, T)` split): not per frame."""

    def __init__(self, by_frame: bool, heads_split_first: bool):
        super().__init__()
        self.by_frame, self.heads_split_first = by_frame, heads_split_first
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.audio_q, self.audio_kv, self.audio_out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 2 * WIDTH), \
            nn.Linear(WIDTH, WIDTH)
        self.ff = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.mod = nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, x, temb, audio):  # x [B, T * P, C], audio [B, T, A, C]
        B, S, C = x.shape
        shift, scale = self.mod(temb)[:, None].chunk(2, -1)
        q, k, v = self.qkv(self.norm(x) * (1 + scale) + shift).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        q = self.audio_q(self.norm(x))
        if self.heads_split_first:  # [B, S, H, d] -> [B * T, H, S / T, d]
            q = q.unflatten(2, (HEADS, -1))
            q = (q.unflatten(1, (FRAMES, -1)) if self.by_frame else q.unflatten(1, (-1, FRAMES)).transpose(1, 2))
            q = q.flatten(0, 1).transpose(1, 2)
        else:  # einops-style: "b (t s) c -> (b t) s c", then the heads
            q = q.unflatten(1, (FRAMES, -1)) if self.by_frame else q.unflatten(1, (-1, FRAMES)).transpose(1, 2)
            q = q.flatten(0, 1).unflatten(2, (HEADS, -1)).transpose(1, 2)
        k, v = self.audio_kv(audio).flatten(0, 1).unflatten(-1, (2, HEADS, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [B * T, H, S / T, d]
        a = a.transpose(1, 2).flatten(2).unflatten(0, (B, FRAMES))  # [B, T, S / T, C]
        a = a.flatten(1, 2) if self.by_frame else a.transpose(1, 2).flatten(1, 2)
        x = x + self.audio_out(a)
        return x + self.ff(self.norm(x))


class AudioDriven(nn.Module):
    def __init__(self, by_frame=True, heads_split_first=True):
        super().__init__()
        self.patch, self.time, self.head = nn.Linear(4, WIDTH), nn.Linear(1, WIDTH), nn.Linear(WIDTH, 4)
        self.blocks = nn.ModuleList(AudioBlock(by_frame, heads_split_first) for _ in range(2))

    def forward(self, latent, timestep, audio):
        x, temb = self.patch(latent), self.time(timestep[:, None] / 1000)
        for block in self.blocks:
            x = block(x, temb, audio)
        return self.head(x)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(batch, FRAMES, AUDIO, WIDTH, generator=g)

    def at(step):
        latent = torch.randn(batch, FRAMES * PER_FRAME, 4, generator=torch.Generator().manual_seed(step))
        return latent, torch.full((batch,), 900.0 - 300 * step), audio

    return at


@pytest.mark.parametrize("heads_split_first", [True, False])
def test_per_frame_cross_attention_goes_sparse_and_keeps_the_contract(heads_split_first):
    torch.manual_seed(0)
    model = AudioDriven(heads_split_first=heads_split_first).eval()
    report = astraea.explain(model, *_inputs()(0))
    assert "run dense" not in str(report), str(report)
    check_sparse_model(model, _inputs(), blocks=2)


def test_a_regrouping_by_position_is_left_as_it_was():
    """Tokens regrouped by position (`(S/T, T)`) attend to the wrong frame's audio under a mask
    by frame: the pass must not match, and the model stays exact."""
    torch.manual_seed(0)
    model = AudioDriven(by_frame=False).eval()
    inputs = _inputs()
    torch._dynamo.reset()
    report = astraea.explain(model, *inputs(0))
    assert "2 attention(s) run dense" in str(report), str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=astraea.backend(schedule=1.0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs(0)), model(*inputs(0)), rtol=1e-5, atol=1e-5)


def test_lowered_by_inductor_it_equals_the_eager_lowering():
    """The frame mask is built in the graph (positions' frames against keys' frames): Inductor
    lowers it with the selection size symbolic, and every budget gives what the eager lowering does."""
    torch.manual_seed(0)
    model, inputs, schedule = AudioDriven().eval(), _inputs(), [1.0, 0.5, 0.25]
    outputs = []
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=astraea.backend(schedule=schedule, lowering=lowering))
        with torch.no_grad():
            outputs.append(torch.stack([compiled(*inputs(step)) for step in range(len(schedule))]))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


class SpatialAttention(nn.Module):
    """Attention within each frame: queries, keys and values all from the tokens, regrouped per
    frame (factorised attention, as STDiT's spatial layers)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)

    def forward(self, x):  # [B, T * P, C]
        B = x.shape[0]
        q, k, v = (t.unflatten(1, (FRAMES, -1)).flatten(0, 1).unflatten(2, (HEADS, -1)).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return a.unflatten(0, (B, FRAMES)).flatten(1, 2)


def test_attention_within_each_frame_is_left_to_the_analysis():
    """Masked by frame it would read every frame's keys (T times the work, and a mask of the
    tokens squared): the pass leaves keys that come from the tokens alone."""
    from astraea.passes.frame_attention import attention_across_frames

    graphs = []
    torch._dynamo.reset()
    torch.compile(SpatialAttention(), backend=lambda gm, _: graphs.append(gm) or gm.forward)(
        torch.randn(2, FRAMES * PER_FRAME, WIDTH))
    assert attention_across_frames(graphs[0]) == 0
