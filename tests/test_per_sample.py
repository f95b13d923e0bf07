"""Each sample of a batch selects its own tokens: a batch of prompts gives what each prompt
gives alone, where the block's tensors let the rewrite gather per sample."""

import functools

import pytest
import torch
import torch.nn.functional as F

import astraea
from tests.contract import ContractChecker
from tests.generated import Block, GeneratedDiT, Knobs
from tests.models import wan

BUDGETS = [1.0, 0.5, 0.25, 0.5]


def _generated(**knobs):
    """(model, latent, context, call) for a batch of two, with a different prompt each."""
    torch.manual_seed(0)
    k = Knobs(tokens=32, **knobs)
    g = torch.Generator().manual_seed(1)
    latent, context = torch.randn(2, k.tokens, 4, generator=g), torch.randn(2, 5, 16, generator=g)
    return GeneratedDiT(k).eval(), latent, context, lambda m, x, t, c: m(x, t, c)


def _wan():
    family = wan(batch=2)
    latent = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(1))
    return family.model, latent, family.conditions[0], family.call


def _generate(model, call, latent, context, checked=False):
    """Euler steps along the model's prediction, one call per step (no guidance); with
    `checked`, every sparse block call is checked against the dense model's block."""
    torch._dynamo.reset()  # a new batch size would otherwise recompile with a symbolic batch
    be = astraea.backend(schedule=BUDGETS)
    compiled = torch.compile(model, backend=be)
    t = lambda step: torch.full((latent.shape[0],), 1000.0 - 200 * step)  # noqa: E731
    with torch.no_grad():
        if checked:
            call(compiled, latent, t(0), context)  # compiles
            be.runners[0].reset()
            be.runners[0].graph_fn = ContractChecker(be.runners[0], atol=1e-4, rtol=1e-4)
        for step in range(len(BUDGETS)):
            latent = latent - 0.2 * call(compiled, latent, t(step), context)
    assert len(be.runners) == 1
    return latent, be.runners[0]


class _EinsumRope(Block):
    """RoPE applied by `einsum` with tables kept as [N, d]: an op that is not element-wise, so the
    tables cannot be read at the queries' rank."""

    def rope(self, q, cos, sin):
        return torch.einsum("bhnd,nd->bhnd", q, cos) + torch.einsum("bhnd,nd->bhnd", q.flip(-1), sin)


class _FrameCausal(Block):
    """Self-attention masked to the keys of its own and earlier frames by an [N, N] mask, as
    autoregressive video models write it: SDPA reads the mask as [1, 1, N, N]."""

    def self_attend(self, q, k, v):
        frame = torch.arange(q.shape[-2], device=q.device) // 8
        return F.scaled_dot_product_attention(q, k, v, attn_mask=frame[:, None] >= frame[None, :])


def _with_blocks(block_class, **knobs):
    """`_generated`, its blocks made `block_class` (a Block that writes one part its own way)."""
    model, latent, context, call = _generated(**knobs)
    for block in model.blocks:
        block.__class__ = block_class
    return model, latent, context, call


@pytest.mark.parametrize("make", [_generated, functools.partial(_generated, rope_rows=True),
                                  functools.partial(_with_blocks, _FrameCausal), _wan],
                         ids=["generated", "rope-tables-without-batch", "frame-causal-mask", "wan"])
def test_a_batch_selects_as_each_sample_alone(make):
    """Tables without a batch are read as broadcasting reads them and gathered per sample: RoPE kept
    as [N, d] (research code's `q * cos` against [B, H, N, d] queries) as [1, 1, N, d], and so an
    [N, N] attention mask."""
    model, latent, context, call = make()
    batched, runner = _generate(model, call, latent, context)
    assert [b.samples for b in runner.blocks] == [2] * len(runner.blocks)
    assert [r.tokens for r in runner.records] == [runner.num_tokens] + [round(b * runner.num_tokens) for b in BUDGETS[1:]]
    state = runner.branches[0].blocks[0]
    assert not torch.equal(state.stale[0], state.stale[1]), "the two samples chose the same tokens"
    for i in range(2):
        alone, _ = _generate(model, call, latent[i : i + 1], context[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_tables_without_a_batch_dim_read_by_einsum_share_one_selection():
    """RoPE tables kept as [N, d] that `einsum` reads cannot be gathered per sample: one selection
    for the batch, a warning that says so, and every sparse block call still keeps the contract."""
    model, latent, context, call = _with_blocks(_EinsumRope, rope_rows=True)
    with pytest.warns(astraea.AstraeaWarning, match=r"one set of tokens for the whole batch of 2: .* \[32, 16\] has no batch"):
        _, runner = _generate(model, call, latent, context, checked=True)
    assert [b.samples for b in runner.blocks] == [1] * len(runner.blocks)
    assert runner.branches[0].blocks[0].stale.shape == (1, runner.num_tokens)
    assert runner.graph_fn.checked == len(BUDGETS) * len(runner.blocks)
