"""Attention written out by hand (matmul, softmax, matmul) is recognised as attention."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import astraea
from astraea.passes.written_attention import collapse_written_attention
from tests.contract import check_generated
from tests.generated import BlockStack, Knobs, stack_inputs

@pytest.mark.parametrize("joint, einops", [(None, False), ("dual", False), ("single", False), (None, True), ("dual", True)])
def test_written_attention_goes_sparse_and_keeps_the_contract(joint, einops):
    """The generated DiT with attention written out (its products by torch.einsum where it uses
    einops): every block sparse, exact at budget 1.0, and the per-block contract at budgets below
    1 (self-, cross- and joint attention)."""
    check_generated(Knobs(written_attention=True, joint=joint, einops=einops))


class Written(nn.Module):
    """One attention in a given hand-written form, on [B, H, N, d]."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, bias):
        d = q.shape[-1]
        if self.form == "scaled":
            return torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(d)), dim=-1) @ v
        if self.form == "divided_masked_dropout":
            s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
            return F.dropout(s.softmax(-1).float(), p=0.0) @ v
        if self.form == "mT_unscaled":
            return (q @ k.mT).softmax(-1) @ v
        if self.form == "returns_map":  # the map is used outside the pattern: left alone
            p = (q @ k.mT).softmax(-1)
            return p @ v, p
        if self.form == "scaled_after_bias":  # (qk + bias) * c is not SDPA's qk * c + bias
            return ((q @ k.mT + bias) * 0.5).softmax(-1) @ v
        if self.form == "einsum":  # as lucidrains-style research code writes it
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * d**-0.5
            return torch.einsum("b h i j, b h j d -> b h i d", s.softmax(dim=-1), v)
        if self.form == "einsum_prescaled_folded":  # q scaled first; heads folded into the batch
            qf, kf, vf = (t.flatten(0, 1) for t in (q * d**-0.5, k, v))
            p = torch.einsum("...id,...jd->...ij", qf, kf).softmax(-1)
            return torch.einsum("...ij,...jd->...id", p, vf).unflatten(0, q.shape[:2])
        if self.form == "einsum_keys_attend":  # scores transposed: each key's softmax over the queries
            return torch.einsum("bhji,bhjd->bhid", torch.einsum("bhid,bhjd->bhji", q, k).softmax(-1), v)
        if self.form.startswith("baddbmm"):  # diffusers' classic AttnProcessor: heads folded into the batch
            b, h, n, _ = q.shape
            qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
            if self.form == "baddbmm_empty_upcast":
                s = torch.baddbmm(torch.empty(b * h, n, n, dtype=q.dtype), qf, kf.transpose(-1, -2), beta=0, alpha=d**-0.5)
            else:  # the mask as baddbmm's input: added with beta 1, and not with 0.5
                mask = bias.expand(b, h, 1, n).flatten(0, 1)
                s = torch.baddbmm(mask, qf, kf.transpose(-1, -2), beta=0.5 if self.form == "baddbmm_half_beta" else 1,
                                  alpha=d**-0.5)
            return torch.bmm(s.float().softmax(dim=-1).to(q.dtype), vf).unflatten(0, (b, h))
        raise ValueError(self.form)


@pytest.mark.parametrize("form, collapsed", [
    ("scaled", 1), ("divided_masked_dropout", 1), ("mT_unscaled", 1), ("returns_map", 0), ("scaled_after_bias", 0),
    ("baddbmm_empty_upcast", 1), ("baddbmm_masked", 1), ("baddbmm_half_beta", 0),
    ("einsum", 1), ("einsum_prescaled_folded", 1), ("einsum_keys_attend", 0),
])
def test_forms_collapse_into_sdpa_with_the_same_values(form, collapsed):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 1, 1, 7, generator=g)
    module = Written(form)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, collapse_written_attention(gm)))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend)(q, k, v, bias)
    gm, found = graphs[0]
    assert found == collapsed
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == collapsed
    assert not collapsed or not [n for n in gm.graph.nodes if n.target in (torch.softmax, "softmax", torch.empty,
                                                                             torch.functional.einsum)]
    torch.testing.assert_close(out, module(q, k, v, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_diffusers_classic_attention_processor_keeps_the_contract(batch):
    """Latte with every attention on diffusers' classic `AttnProcessor` (heads folded into the
    batch, scores by `baddbmm`, an upcast softmax, `bmm`): its blocks go sparse and keep the
    contract, each sample's LSE read as its own (they ran dense before: `baddbmm` unknown)."""
    from diffusers.models.attention_processor import AttnProcessor

    from tests.support_models import latte
    from tests.test_contract import checked_run

    family = latte(batch)
    for module in family.model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(AttnProcessor())
    be, checker = checked_run(family, 3, schedule=0.5)
    report = be.reports[0]
    assert report.num_sparse_blocks == report.num_blocks == 2
    assert checker.checked == 6 * report.num_sparse_blocks


class _FoldedBlock(nn.Module):
    """Heads folded into the batch ([B * H, N, d], batch-major) and scores by `baddbmm`."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mod, self.ff, self.norm = nn.Linear(width, 2 * width), nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x, temb):
        b, n, w = x.shape
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        y = self.norm(x) * (1 + scale) + shift
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2).flatten(0, 1) for t in self.qkv(y).chunk(3, -1))
        s = torch.baddbmm(torch.empty(b * self.heads, n, n), q, k.transpose(-1, -2), beta=0, alpha=q.shape[-1] ** -0.5)
        a = torch.bmm(s.softmax(dim=-1), v).unflatten(0, (b, self.heads)).transpose(1, 2).reshape(b, n, w)
        x = x + self.out(a)
        return x + self.ff(x)


def test_heads_folded_into_the_batch_keep_a_selection_per_sample():
    """Two samples, each with its own selection: the attention's LSE, [1, B * H, K] on the folded
    heads, is read as [B, H, K] by the merge (it refused the folded shape before)."""
    from tests.contract import check_sparse_model

    torch.manual_seed(0)
    check_sparse_model(BlockStack([_FoldedBlock(32), _FoldedBlock(32)], 32).eval(), stack_inputs(24), 2)
