"""Joint attention (text joined to video) keeps the FLOP budget: at r, a forward costs r of the
dense FLOPs plus only what must see every token, counted from the config. Those are the keys and
values of all video tokens, and the text segment, which every step computes in full."""

import pytest
import torch

from tests import support_models
from tests.contract import budget_flops

BUDGET = 0.5
# The support table's tiny models on latents of 4 x 32 x 32 (4 x 16 x 16 = 1,024 video tokens
# after the 2 x 2 patch); CogVideoX lays latents out [B, F, C, H, W], HunyuanVideo [B, C, F, H, W].
CASES = {"cogvideox": (support_models.cogvideox, (1, 4, 4, 32, 32)),
         "hunyuan_video": (support_models.hunyuan_video, (1, 4, 4, 32, 32))}


def joint_costs(config, video: int, text: int) -> tuple[int, int]:
    """(keys and values of every video token, all the text segment's work), summed over blocks.

    Every block, dual-stream or single-stream, runs 4 + 2m width x width matmuls per token, m the
    MLP ratio: q, k, v, out and the MLP's two (HunyuanVideo's single-stream block: q, k, v, MLP in,
    and one output over the attention and MLP widths). CogVideoX's MLP is diffusers' default 4x.
    """
    width = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.get("num_single_layers", 0)
    per_token = 2 * width * width * (4 + 2 * config.get("mlp_ratio", 4))
    keys_values = blocks * 2 * (2 * video * width * width)
    text_work = blocks * (text * per_token + 4 * text * (video + text) * width)  # + its queries over all keys
    return keys_values, text_work


@pytest.mark.parametrize("name", CASES)
def test_joint_flops_follow_budget(name):
    make, shape = CASES[name]
    family = make()
    dense, sparse, be = budget_flops(family, torch.randn(shape), family.conditions[0], BUDGET)
    runner = be.runners[0]
    n = be.reports[0].num_tokens
    assert n == 4 * 16 * 16
    assert runner.records[-1].tokens == round(BUDGET * n)
    keys_values, text_work = joint_costs(family.model.config, n, support_models.TEXT_LEN)
    bound = BUDGET * dense + keys_values + text_work + 0.02 * dense
    print(f"{name}: dense {dense:,}, sparse {sparse:,} ({sparse / dense:.3f}), keys/values {keys_values / dense:.3f}, "
          f"text {text_work / dense:.3f}, bound {bound / dense:.3f}")
    assert sparse <= bound
    assert sparse < 0.75 * dense  # halfway to dense: a model that ran dense fails here
