"""Model code the analysis met first in Cosmos 3 Omni, written by hand: one unbatched sequence
([tokens, channels], no batch dim) through the blocks, a causal text stream beside the video's,
and an output filled into a fresh tensor by index writes. Each is checked against the eager
model with the block contract (tests/contract.py); each fails without the part of the analysis
it names."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import astraea
from tests.contract import check_sparse_model
from tests.generated import BlockStack, stack_inputs
from tests.test_empty_parts import WanLikeBlock

WIDTH, HEADS, TEXT, VIDEO = 32, 2, 5, 24


class PackedBlock(nn.Module):
    """Text attends causally to itself; video attends to the text and to itself (Cosmos 3's
    understanding and generation pathways), each with its own weights; per-token modulation."""

    def __init__(self):
        super().__init__()
        self.txt_qkv, self.vid_qkv = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, 3 * WIDTH)
        self.txt_out, self.vid_out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.vid_ff = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
        self.norm = nn.LayerNorm(WIDTH, elementwise_affine=False)

    def forward(self, txt, vid, temb):
        tq, tk, tv = (_heads(t) for t in self.txt_qkv(txt).chunk(3, -1))
        h = self.norm(vid) * (1 + temb)
        vq, vk, vv = (_heads(t) for t in self.vid_qkv(h).chunk(3, -1))
        t_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        v_out = F.scaled_dot_product_attention(vq, torch.cat([tk, vk], 2), torch.cat([tv, vv], 2))
        txt = txt + self.txt_out(t_out[0].transpose(0, 1).flatten(1))
        vid = vid + self.vid_out(v_out[0].transpose(0, 1).flatten(1))
        return txt, vid + self.vid_ff(self.norm(vid))


def _heads(x):
    """[N, C] -> [1, heads, N, d], as diffusers' attention dispatch gets it: [1, N, heads, d], transposed."""
    return x.view(-1, HEADS, WIDTH // HEADS).unsqueeze(0).transpose(1, 2)


class Packed(nn.Module):
    """One sequence: text embeddings then video patches, split into the two streams; the video
    rows returned in a fresh tensor, written by index."""

    def __init__(self):
        super().__init__()
        self.embed, self.patch, self.time = nn.Embedding(16, WIDTH), nn.Linear(4, WIDTH), nn.Linear(1, WIDTH)
        self.blocks, self.head = nn.ModuleList([PackedBlock(), PackedBlock()]), nn.Linear(WIDTH, 4)

    def forward(self, ids, latent, timesteps):  # ids [TEXT], latent [VIDEO, 4], timesteps [VIDEO]: one per token
        seq = torch.cat([self.embed(ids), self.patch(latent)])
        txt, vid, temb = seq[:TEXT], seq[TEXT:], self.time(timesteps[:, None] / 1000)
        for block in self.blocks:
            txt, vid = block(txt, vid, temb)
        out = latent.new_zeros(latent.shape)
        out[torch.arange(VIDEO)] = self.head(vid)
        return out


def _packed_inputs(step):
    g = torch.Generator().manual_seed(step)
    return torch.arange(TEXT), torch.randn(VIDEO, 4, generator=g), torch.full((VIDEO,), 900.0 - 300 * step)


def test_an_unbatched_packed_sequence_goes_sparse_and_keeps_the_contract():
    torch.manual_seed(0)
    model = Packed().eval()
    report = astraea.explain(model, *_packed_inputs(0))
    assert (report.num_sparse_blocks, report.num_tokens) == (2, VIDEO), report
    check_sparse_model(model, _packed_inputs, 2)
    outs = []  # lowered by Inductor as on a GPU, skipped steps and forecasts included: as run eagerly
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.5, 0.0, 0.25, 0.0], lowering=lowering, reuse="forecast")
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            outs.append([compiled(*_packed_inputs(step)) for step in range(5)])
    torch._dynamo.reset()
    for eager, lowered in zip(*outs):
        torch.testing.assert_close(lowered, eager, rtol=1e-5, atol=1e-5)


class WrittenHead(BlockStack):
    """`BlockStack` whose output is a fresh tensor its result is written into by index."""

    def forward(self, latent, timestep):
        out = latent.new_zeros(latent.shape)
        out[:, torch.arange(latent.shape[1])] = super().forward(latent, timestep)
        return out


def test_an_output_written_by_index_into_a_fresh_tensor_keeps_the_blocks_sparse():
    torch.manual_seed(0)
    check_sparse_model(WrittenHead([WanLikeBlock(), WanLikeBlock()], 32).eval(), stack_inputs(12), 2)
