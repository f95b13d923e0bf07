"""Property tests over generated DiT-like modules: dense at budget 1, the contract at any budget
and batch size, and blocks that mix tokens in ways the rewrite does not understand stay dense."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import astraea
from tests.contract import ContractChecker
from tests.generated import MIXING, GeneratedDiT, Knobs


@st.composite
def knobs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    depth = draw(st.integers(1, 3))
    return Knobs(
        depth=depth, width=heads * draw(st.sampled_from([4, 8])), heads=heads, tokens=draw(st.integers(6, 40)),
        cross=draw(st.booleans()), modulation=draw(st.booleans()), gated=draw(st.booleans()),
        rope=draw(st.booleans()), rope_rows=draw(st.booleans()), fused_qkv=draw(st.booleans()), mixing=draw(st.sampled_from(MIXING)),
        mixing_block=draw(st.integers(0, depth - 1)),
    )


def _run(model, compiled, k, budgets, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, k.tokens, 4, generator=g)
    context = torch.randn(batch, 5, 16, generator=g)
    outs = []
    with torch.no_grad():
        for step, _ in enumerate(budgets):
            t = torch.full((batch,), 1000.0 - 100 * step)
            outs.append((model(latent, t, context), compiled(latent, t, context)))
            latent = latent + 0.1 * torch.randn(latent.shape, generator=g)
    return outs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=knobs(), budgets=st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0]), min_size=2, max_size=4),
       batch=st.integers(1, 2), seed=st.integers(0, 1000))
def test_generated_models(k, budgets, batch, seed):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = GeneratedDiT(k).eval()
    dense_be = astraea.backend(schedule=1.0)
    for dense, out in _run(model, torch.compile(model, backend=dense_be), k, budgets, seed, batch):
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0] + budgets)
    compiled = torch.compile(model, backend=be)
    _run(model, compiled, k, [1.0], seed, batch)  # compile
    report = be.reports[0]
    if k.mixing is None:
        assert report.num_sparse_blocks == report.num_blocks == k.depth
    else:  # nothing after the mixing op is sparse (the contract check below covers the rest)
        assert report.num_sparse_blocks <= k.mixing_block + 1
    if report.num_sparse_blocks:
        runner = be.runners[0]
        runner.reset()
        checker = runner.graph_fn = ContractChecker(runner, atol=1e-4, rtol=1e-4)
        _run(model, compiled, k, [1.0] + budgets, seed, batch)
        # Per sample unless a gathered table lacks the batch dim.
        per_sample = batch > 1 and not (k.rope and k.rope_rows)
        assert all(b.samples == (batch if per_sample else 1) for b in runner.blocks)
        assert checker.checked == (1 + len(budgets)) * report.num_sparse_blocks
