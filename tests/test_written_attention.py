"""Attention written out by hand (matmul, softmax, matmul) is recognised as attention."""

import math
import operator

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
    _check_collapsed(Written(form), collapsed, q, k, v, bias)


def _check_collapsed(module, collapsed, *inputs, tol=1e-5):
    """`module` compiled on `inputs` with the pass as backend: `collapsed` attentions become SDPA,
    none of their ops left, the values those of eager; a graph with none collapsed left as it was."""
    graphs = []

    def backend(gm, example_inputs):
        before = gm.code
        graphs.append((gm, collapse_written_attention(gm), before))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend)(*inputs)
    gm, found, before = graphs[0]
    assert found == collapsed
    sdpa = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == collapsed
    assert not collapsed or not [n for n in gm.graph.nodes if n.target in (torch.softmax, "softmax", torch.empty,
                                                                             torch.functional.einsum, operator.sub)]
    assert collapsed or gm.code == before
    torch.testing.assert_close(out, module(*inputs), rtol=tol, atol=tol)


class Masked(nn.Module):
    """One attention on [B, H, N, d] with its mask written on the scores, in a given form; `keys`
    [B, 1, 1, N] marks each sample's valid keys, `frames` (built here) lets a query see the keys
    of its frame and the frames before (3 tokens a frame)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, keys):
        form, n = self.form, q.shape[2]
        frame = torch.arange(n) // 3
        frames = frame[:, None] >= frame[None, :]  # [N, N]
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if form == "keys_inf":  # key padding, [B, 1, 1, N]
            return s.masked_fill(~keys, float("-inf")).softmax(dim=-1) @ v
        if form == "keys_lowest_einsum":  # as lucidrains-style code writes it
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
            s = torch.masked_fill(s, keys == 0, torch.finfo(s.dtype).min)
            return torch.einsum("b h i j, b h j d -> b h i d", s.softmax(dim=-1), v)
        if form == "frames_1e9_in_place":  # one mask for every sample and head, [N, N]
            s = s.masked_fill_(~frames, -1e9)
            return s.softmax(dim=-1) @ v
        if form == "frames_and_keys_inf":  # [B, 1, N, N]
            return s.masked_fill(~(frames & keys), float("-inf")).softmax(dim=-1) @ v
        if form == "folded_keys_1d":  # heads folded into the batch, one key mask for all, [N]
            qf, kf, vf = (t.flatten(0, 1) for t in (q, k, v))
            s = torch.bmm(qf, kf.transpose(1, 2)).masked_fill(~keys[1, 0, 0], float("-inf")) * 1.0
            return torch.bmm(s.softmax(-1), vf).unflatten(0, q.shape[:2])
        if form.startswith("sat"):  # CogVideoX SAT's standard_attention
            s = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
            m = (frames & keys).to(q.dtype) if form == "sat" else torch.sigmoid(k.sum(-1))[:, :, None, :]  # soft: no mask
            s = torch.mul(s, m) - 10000.0 * (1.0 - m)
            return torch.matmul(F.softmax(s, dim=-1), v)
        if form == "empty_row_1e9":  # the first query sees no key: uniform over all of them, both ways
            return s.masked_fill(~frames | (torch.arange(n) == 0)[:, None], -1e9).softmax(dim=-1) @ v
        if form == "upcast_1e9":  # float16 products upcast, then filled with -1e9, beyond float16
            s = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
            return s.masked_fill(~keys, -1e9).softmax(dim=-1).half() @ v
        if form == "fill_zero":  # a fill that is no mask
            return s.masked_fill(~keys, 0.0).softmax(dim=-1) @ v
        if form == "filled_then_scaled":  # the fill scaled too: left alone, as a bias before a scaling
            return ((q @ k.mT).masked_fill(~keys, float("-inf")) * 0.5).softmax(dim=-1) @ v
        if form == "filled_in_place_unassigned":  # the softmax reads the scores the fill changed in place
            s.masked_fill_(~keys, float("-inf"))
            return s.softmax(dim=-1) @ v
        if form == "mask_broadcasts_scores":  # the fill makes the scores larger: no mask on them
            return s.masked_fill(~keys.expand(2, -1, -1, -1, -1), float("-inf")).softmax(dim=-1) @ v
        raise ValueError(form)


@pytest.mark.parametrize("form, collapsed", [
    ("keys_inf", 1), ("keys_lowest_einsum", 1), ("frames_1e9_in_place", 1), ("frames_and_keys_inf", 1),
    ("folded_keys_1d", 1), ("sat", 1), ("empty_row_1e9", 1),
    ("sat_soft", 0), ("fill_zero", 0), ("filled_then_scaled", 0), ("filled_in_place_unassigned", 0),
    ("mask_broadcasts_scores", 0),
])
def test_masks_written_on_the_scores_collapse_with_the_same_values(form, collapsed):
    """`masked_fill` with -inf or a large negative fill, and SAT's `s * m - 10000 * (1 - m)` on a
    bool mask cast to numbers, become SDPA with the mask added, exact (a fill of -1e9 even in a
    row with no key left); a fill that is no mask, a mask that is not 0/1, a fill scaled after it
    or made in place behind the softmax's back leave the graph as it was."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    keys = (torch.arange(7) < torch.tensor([7, 4])[:, None])[:, None, None]  # the second sample: 3 keys padded
    _check_collapsed(Masked(form), collapsed, q, k, v, keys)


def test_a_fill_beyond_the_products_dtype_still_masks():
    """float16 products, upcast and filled with -1e9, which float16 cannot hold: the mask is
    added in float16, at its lowest (SDPA takes q's dtype), with eager's values to float16's
    precision."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g).half() for _ in range(3))
    keys = (torch.arange(7) < torch.tensor([7, 4])[:, None])[:, None, None]
    _check_collapsed(Masked("upcast_1e9"), 1, q, k, v, keys, tol=2e-3)


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


class _MaskedBlock(nn.Module):
    """A block whose self-attention masks its scores as research code writes it: "frames",
    `masked_fill(~frame_causal, -inf)` ([N, N]); "keys", a key-padding mask per sample
    ([B, 1, 1, N]) filled with the dtype's lowest, by einsum; "sat", SAT's
    `s * m - 10000 * (1 - m)` with both masks. q and k are normalised (as CogVideoX's are), which
    keeps the scores in the range where a fill of -10000 masks: eager's too, and the collapsed
    attention is only exact where it does."""

    def __init__(self, form: str, width=32, heads=2):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mod, self.ff, self.norm = nn.Linear(width, 2 * width), nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x, temb):
        b, n, w = x.shape
        scale, shift = self.mod(temb)[:, None].chunk(2, dim=-1)
        y = self.norm(x) * (1 + scale) + shift
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(y).chunk(3, -1))
        q, k = (F.layer_norm(t, t.shape[-1:]) for t in (q, k))
        frame = torch.arange(n) // 6
        frames = frame[:, None] >= frame[None, :]
        keys = (torch.arange(n) < n - 1 - torch.arange(b)[:, None])[:, None, None]  # sample i: i + 1 keys padded
        if self.form == "frames":
            s = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).masked_fill(~frames, float("-inf"))
        elif self.form == "keys":
            s = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
            s = s.masked_fill(~keys, torch.finfo(s.dtype).min)
        else:
            m = (frames & keys).to(q.dtype)
            s = torch.matmul(q / math.sqrt(q.shape[-1]), k.transpose(-1, -2))
            s = torch.mul(s, m) - 10000.0 * (1.0 - m)
        a = (s.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, w)
        x = x + self.out(a)
        return x + self.ff(x)


@pytest.mark.parametrize("form", ["frames", "keys", "sat"])
def test_masks_written_on_the_scores_go_sparse_and_keep_the_contract(form):
    """Self-attention masked by `masked_fill` (frame-causal, key padding) or SAT's product form:
    every block sparse, exact at budget 1.0, and the contract below it (they ran dense before,
    the token axis lost in the contraction over the keys)."""
    from tests.contract import check_sparse_model

    torch.manual_seed(0)
    check_sparse_model(BlockStack([_MaskedBlock(form), _MaskedBlock(form)], 32).eval(), stack_inputs(24), 2)
