"""The token axis is known by where it comes from, not by its size: a clip whose token count
equals another dimension of the model (text length, channels, head dim, width, FFN width)
goes sparse like any other, keeps the contract, and is exact at budget 1.0."""

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel

import astraea
from tests.contract import ContractChecker
from tests.models import Family, cogvideox, hunyuan, sample, wan

# Wan: in_channels 20, 12 text tokens, head dim 8, width 16, FFN 24; patch (1, 2, 2) over a
# 4x4 latent gives 4 tokens per frame, so the frame count picks the token count.
WAN_SIZES = {"text": 12, "channels": 20, "head_dim": 8, "width": 16, "ffn": 24}
# LTX: patch 1, 2x2 latent: 4 tokens per frame; 8 text tokens, in_channels 12, head dim 8,
# width 16; its FFN is 4x the width (64 = 16 frames).
LTX_SIZES = {"text": 8, "channels": 12, "head_dim": 8, "width": 16, "ffn": 64}


def wan_at(tokens: int) -> Family:
    return wan(frames=tokens // 4, size=4, dim_head=8, channels=20, text_tokens=12, ffn_dim=24)


def ltx_at(tokens: int) -> Family:
    torch.manual_seed(0)
    frames = tokens // 4
    model = LTXVideoTransformer3DModel(
        in_channels=12, out_channels=12, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=32,
    ).eval()
    cond, uncond = torch.randn(1, 8, 32), torch.zeros(1, 8, 32)
    mask = torch.ones(1, 8)

    def call(m, x, t, e):
        return m(
            hidden_states=x, encoder_hidden_states=e, timestep=t.expand(x.shape[0]), encoder_attention_mask=mask,
            num_frames=frames, height=2, width=2, return_dict=False,
        )[0]

    return Family("ltx", model, (1, tokens, 12), call, (cond, uncond), True)


def check(family: Family):
    """Every block sparse; budget 1.0 equal to eager; the contract at budgets below 1."""
    torch._dynamo.reset()
    reference = sample(family, family.model, steps=2)
    be = astraea.backend(schedule=1.0)
    out = sample(family, torch.compile(family.model, backend=be), steps=2)
    assert torch.linalg.norm(out - reference) / torch.linalg.norm(reference) <= 1e-5
    report = be.reports[0]
    assert report.num_sparse_blocks == report.num_blocks >= 2, str(report)

    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.5, 0.5])
    compiled = torch.compile(family.model, backend=be)
    sample(family, compiled, steps=1)
    runner = be.runners[0]
    runner.reset()
    checker = runner.graph_fn = ContractChecker(runner)
    sample(family, compiled, steps=3)
    assert checker.checked == 6 * report.num_sparse_blocks
    return report


@pytest.mark.parametrize("collides_with", sorted(WAN_SIZES))
def test_wan_tokens_equal_to_another_dim(collides_with):
    report = check(wan_at(WAN_SIZES[collides_with]))
    assert report.num_tokens == WAN_SIZES[collides_with]


@pytest.mark.parametrize("collides_with", sorted(LTX_SIZES))
def test_ltx_tokens_equal_to_another_dim(collides_with):
    report = check(ltx_at(LTX_SIZES[collides_with]))
    assert report.num_tokens == LTX_SIZES[collides_with]


def test_joint_attention_with_as_many_video_tokens_as_text_tokens():
    """CogVideoX with 8 text tokens and 8 video tokens (2 frames of 2x2 patches): the joint
    axis is two segments of one size; the video one is found by where it comes from."""
    family = cogvideox()
    family.latent_shape = (1, 2, 4, 4, 4)
    report = check(family)
    assert report.num_tokens == 8


def test_hunyuan_with_as_many_video_tokens_as_text_tokens():
    family = hunyuan()
    family.latent_shape = (1, 4, 2, 4, 4)  # 2 frames of 2x2 patches: 8 tokens, as many as the text
    report = check(family)
    assert report.num_tokens == 8


def test_dense_fallback_at_a_new_shape_says_the_model_was_sparse_before():
    """A model compiled sparse at one resolution, then at a shape too small to select from
    (one token), warns that it now runs dense and at which token counts."""
    torch._dynamo.reset()
    family = wan_at(8)
    be = astraea.backend(schedule=1.0)
    compiled = torch.compile(family.model, backend=be)
    sample(family, compiled, steps=1)
    assert be.reports[-1].num_sparse_blocks == 2
    family.latent_shape = (1, 20, 1, 2, 2)  # one token
    with pytest.warns(astraea.AstraeaWarning, match="ran sparse at 8 tokens, but at this shape it runs dense"):
        sample(family, compiled, steps=1)
