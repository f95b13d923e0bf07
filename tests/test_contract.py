"""Budget r < 1 keeps the contract of a token-sparse block, and costs about r of the FLOPs."""

import pytest
import torch
import astraea
from tests.contract import ContractChecker, budget_flops
from tests.models import cogvideox, hunyuan, ltx, sample, wan
from tests.support_models import CASES


def checked_run(family, steps, **options):
    """Compile with `options`, then sample `steps` with every block call checked (after a reset)."""
    torch._dynamo.reset()
    be = astraea.backend(**options)
    compiled = torch.compile(family.model, backend=be)
    sample(family, compiled, steps=1)  # compiles; step 0 is dense
    runner = be.runners[0]
    runner.reset()
    checker = runner.graph_fn = ContractChecker(runner)
    sample(family, compiled, steps=steps)
    return be, checker


@pytest.mark.parametrize("make", [wan, ltx, cogvideox, hunyuan], ids=["wan", "ltx", "cogvideox", "hunyuan"])
@pytest.mark.parametrize("policy", ["astraea", "delta", "random"])
def test_selected_rows_equal_dense_block_and_others_reuse_cache(make, policy):
    """Wan and LTX: one stream with cross-attention; CogVideoX: dual-stream joint attention
    (text and video weights share one attention over the concatenation); HunyuanVideo: a
    dual-stream block, then a single-stream block over the concatenated tokens."""
    be, checker = checked_run(make(), 5, schedule=[1.0, 0.5, 0.25, 0.75, 0.5], policy=policy)
    assert checker.checked == 10 * be.reports[0].num_sparse_blocks
    joint = make in (cogvideox, hunyuan)
    assert (checker.segments > 0) == joint  # the text stream each joint block hands on is exact
    n = be.reports[0].num_tokens
    sizes = [call[0].shape[-1] for call in checker.selected]
    assert sizes == [n, n] + [round(b * n) for b in (0.5, 0.5, 0.25, 0.25, 0.75, 0.75, 0.5, 0.5)]


@pytest.mark.parametrize("label", ["EasyAnimateTransformer3DModel", "CosmosTransformer3DModel", "ConsisIDTransformer3DModel", "Kandinsky5Transformer3DModel", "MiniMaxH3Transformer3DModel", "LTX2VideoTransformer3DModel", "LatteTransformer3DModel", "SanaVideoTransformer3DModel", "WanTransformer3DModel (Wan 2.2 TI2V, per-token timestep)", "SkyReelsV2Transformer3DModel (diffusion forcing, per-frame timestep)", "AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel", "Cosmos3OmniTransformer", "SanaWMTransformer3DModel", "MochiTransformer3DModel (capture_dynamic_output_shape_ops)"])
def test_contract_on_support_models(label):
    """Mechanisms met first in a diffusers class: EasyAnimate writes RoPE into the video part of
    its joint queries/keys in place; Cosmos repeats keys over heads (grouped-query attention)
    and adds a positional embedding at the start of every block; Sana-Video's self-attention is
    linear (a values^T keys summary over every token, written as matmuls), and its feed-forward
    convolves the token grid, so its blocks end before it and the convolutions run on every
    token between them; Wan 2.2 TI2V and SkyReels-V2's diffusion forcing modulate each token (or
    frame) by its own timestep, a table gathered with the selected tokens; AnyFlow rotates its
    queries and keys as complex numbers (view_as_complex, a product with a complex table,
    view_as_real); AnyFlow FAR attends through `flex_attention` (no mask) over its KV cache and the
    chunk's own keys; SANA-WM modulates each frame with its own timestep's table, written on the
    tokens split into frames (its softmax-attention block; the gated-delta-net block stays dense);
    Mochi attends over each sample's valid text tokens only, gathered by `nonzero` (captured by
    dynamo) and padded back, which the analysis reads as attention with a key mask; Cosmos 3 Omni
    runs one unbatched sequence ([tokens, channels]), a causal text stream beside the video's,
    whose attention reads both, and returns the video scattered into a fresh tensor by index
    writes."""
    case = next(c for c in CASES if c.label == label)
    with case.traced():
        be, checker = checked_run(case.build(), 3, schedule=0.5)
    assert be.reports[0].num_sparse_blocks == be.reports[0].num_blocks > 0
    assert checker.checked == 6 * be.reports[0].num_sparse_blocks


@pytest.mark.parametrize("batch", [1, 2])
def test_factorised_attention_keeps_contract(batch):
    """Latte's temporal attention regroups [B * F, N, C] as [B * N, F, C] (folded into the batch
    when B > 1, with a per-(sample, token) timestep table): its blocks go sparse with one
    selection for the batch, every frame of a selected position recomputed."""
    from tests.support_models import latte

    be, checker = checked_run(latte(batch), 3, schedule=0.5)
    report = be.reports[0]
    assert report.num_sparse_blocks == report.num_blocks == 2
    assert checker.checked == 6 * report.num_sparse_blocks
    # Each block is a layer: a spatial block, then a temporal one (the last block too: it ends
    # after the reshape back that follows its temporal block).
    assert [b.samples for b in be.runners[0].blocks] == [1, 1]


@pytest.mark.parametrize("group,group_size", [("spatial", 1), ("run", 4)])
def test_grouped_selection_keeps_contract(group, group_size):
    be, checker = checked_run(wan(), 3, schedule=0.5, group=group, group_size=group_size)
    frames, h, w = be.reports[0].token_grid
    for call in checker.selected[2:]:
        idx = call[0][0]
        if group == "spatial":  # whole columns: the same positions in every frame
            positions = (idx % (h * w)).view(frames, -1)
            assert (positions == positions[0]).all()
        else:
            assert (idx.view(-1, group_size) // group_size).unique(dim=1).shape[1] == 1


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
def test_flops_follow_budget(budget):
    heads, dim_head, layers = 2, 32, 2
    family = wan(frames=4, size=32, layers=layers, heads=heads, dim_head=dim_head)  # 4x16x16 = 1,024 tokens
    dense, sparse, be = budget_flops(family, torch.randn(family.latent_shape), family.conditions[0], budget)
    n, width = be.reports[0].num_tokens, heads * dim_head
    assert n >= 1024
    keys_values = layers * 2 * (2 * n * width * width)  # K and V projections of every token
    assert be.runners[0].records[-1].tokens == round(budget * n)
    assert sparse <= budget * dense + keys_values + 0.02 * dense
    assert sparse >= budget * dense * 0.9  # the count saw the sparse work at all
    print(f"budget {budget}: sparse/dense FLOPs {sparse / dense:.3f}, bound {(budget * dense + keys_values) / dense + 0.02:.3f}")


def test_linear_attention_flops_follow_budget():
    """Sana-Video at r = 0.5 on 1,024 tokens: what sees every token (keys, values and their
    summary, and the feed-forward, whose convolutions over the token grid run on every token
    between blocks), plus r of the rest; this model saves far less than r."""
    from tests.support_models import sana_video

    family, budget = sana_video(), 0.5
    dense, sparse, be = budget_flops(family, torch.randn(1, 4, 4, 32, 32), family.conditions[0], budget)
    config, n = family.model.config, be.reports[0].num_tokens
    width = config.num_attention_heads * config.attention_head_dim
    hidden = int(config.mlp_ratio * width)
    per_block = 2 * (2 * n * width * width) + 2 * n * width * config.attention_head_dim  # k, v, values^T keys
    per_block += 2 * n * (width * 2 * hidden + 9 * 2 * hidden + hidden * width + 3 * width * width)  # the convolutions
    every_token = config.num_layers * per_block
    bound = budget * (dense - every_token) + every_token + 0.02 * dense
    assert n == 1024 and be.reports[0].num_sparse_blocks == config.num_layers
    assert budget * dense * 0.9 <= sparse <= bound
    print(f"Sana-Video at {budget}: sparse/dense FLOPs {sparse / dense:.3f}, bound {bound / dense:.3f}")


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float8_e4m3fn"])
def test_low_precision_caches_keep_contract(cache_dtype):
    be, checker = checked_run(wan(), 3, schedule=0.5, cache_dtype=cache_dtype)
    assert checker.checked == 6 * be.reports[0].num_sparse_blocks
    assert be.runners[0].branches[0].blocks[0].cache.dtype == getattr(torch, cache_dtype)


@pytest.mark.parametrize("joint", [None, "dual"])
def test_grouped_query_attention_keeps_contract(joint):
    """SDPA with `enable_gqa` (fewer key/value heads than query heads): the sparse attention reads
    each group's key/value head as it is."""
    from tests.contract import check_generated
    from tests.generated import Knobs

    check_generated(Knobs(heads=4, width=32, grouped_query=True, joint=joint))
