"""Attention over the valid text rows gathered by `nonzero` (Mochi), rewritten as masked attention
of static shape by `astraea.passes.compacted_attention`: the same function for every mask, in
one graph without `nonzero`; patterns it does not cover are left as they are."""

import pytest
import torch
import torch.nn.functional as F

from astraea.passes.compacted_attention import expand_compacted_attention
from tests.contract import check_sparse_model
from tests.support_models import mochi

MASKS = [  # 8 text tokens: all valid, padding at the end, gaps, none valid
    [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0],
]


def rewriting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append((gm, expand_compacted_attention(gm)))
        return gm
    return backend


@pytest.fixture(scope="module")
def family():
    return mochi()


@pytest.mark.parametrize("batch", [1, 2])
def test_every_mask_gives_the_eager_output_from_one_graph_without_nonzero(family, batch):
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(family.model, backend=rewriting_backend(graphs))
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *family.latent_shape[1:]), generator=g)
    text = torch.randn(batch, 8, 32, generator=g)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        for first in range(len(MASKS)):
            mask = torch.tensor([MASKS[(first + i) % len(MASKS)] for i in range(batch)], dtype=torch.bool)
            inputs = dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.full((batch,), 500.0),
                          encoder_attention_mask=mask, return_dict=False)
            torch.testing.assert_close(compiled(**inputs)[0], family.model(**inputs)[0], rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    assert len(graphs) == 1, "a mask recompiled the model"
    gm, rewritten = graphs[0]
    assert rewritten == 2 * batch  # one attention per block and sample
    assert not [n for n in gm.graph.nodes if n.target is torch.nonzero]


class Compacted(torch.nn.Module):
    """Mochi's attention reduced to its pattern; `variant` breaks it one way."""

    def __init__(self, variant=None):
        super().__init__()
        self.variant = variant

    def forward(self, q, text, mask):
        idx = torch.nonzero(mask).flatten()
        picked = text[:, :, idx, :]
        joint = torch.cat([q, picked], dim=2)
        out = F.scaled_dot_product_attention(joint, joint, joint, is_causal=self.variant == "causal")
        out = F.pad(out, (0, 0, 0, q.shape[2] + text.shape[2] - out.shape[2]))
        return (out, idx) if self.variant == "index returned" else out


@pytest.mark.parametrize("variant", [None, "causal", "index returned"])
def test_only_the_whole_pattern_is_rewritten(variant):
    graphs = []
    torch._dynamo.reset()
    q, text = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    mask = torch.tensor([True, False, True])
    module = Compacted(variant)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out = torch.compile(module, backend=rewriting_backend(graphs), fullgraph=True)(q, text, mask)
    torch._dynamo.reset()
    (gm, rewritten), = graphs
    assert rewritten == (variant is None)
    kept = [n for n in gm.graph.nodes if n.target is torch.nonzero]
    assert bool(kept) == (variant is not None)
    expected = module(q, text, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


class Called(torch.nn.Module):
    """Mochi called with positional inputs, as the contract checker calls a model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, text, t, mask):
        return self.model(hidden_states=x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                          return_dict=False)[0]


def test_mochi_keeps_the_contract_with_a_mask_per_sample(family):
    """Two samples with their own text masks (each attention loops over the batch): every block
    sparse, exact at budget 1.0, the block contract at 0.5 and 0.25."""
    def inputs(step):
        g = torch.Generator().manual_seed(step)
        mask = torch.tensor([MASKS[2], MASKS[1]], dtype=torch.bool)
        return (torch.randn(2, *family.latent_shape[1:], generator=g), torch.randn(2, 8, 32, generator=g),
                torch.full((2,), 900.0 - 100 * step), mask)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        check_sparse_model(Called(family.model).eval(), inputs, 2)
