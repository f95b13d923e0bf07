"""Factorised attention on a flat stream (Open-Sora's STDiT and research code like it): the
residual stream is [B, T * S, C], each layer within frames regroups it as `(b t) s c` and each
layer across frames as `(b s) t c` (the generated DiT's `factorised` knob). Its tokens are read as
(frame, position) pairs; every frame selects the same positions, so both regroupings of the
selected rows are plain reshapes."""

import pytest
import torch

import astraea
from tests.contract import ContractChecker, check_sparse_model
from tests.generated import GeneratedDiT, Knobs

FRAMES, POSITIONS = 3, 8


def stdit(einops: bool) -> GeneratedDiT:
    """Two pairs of layers (within frames, then across), with cross-attention to text."""
    torch.manual_seed(0)
    return GeneratedDiT(Knobs(depth=4, tokens=FRAMES * POSITIONS, factorised=FRAMES, rope=False, einops=einops)).eval()


def inputs_for(batch: int):
    def inputs(step: int):
        g = torch.Generator().manual_seed(step)
        return (torch.randn(batch, FRAMES * POSITIONS, 4, generator=g), torch.full((batch,), 900.0 - 100 * step),
                torch.randn(batch, 5, 16, generator=g))
    return inputs


@pytest.mark.parametrize("einops", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
def test_each_pair_of_layers_goes_sparse_and_keeps_the_contract(einops, batch):
    model = stdit(einops)
    report = astraea.explain(model, *inputs_for(batch)(0))
    assert report.whole_positions and report.token_grid == (FRAMES, POSITIONS), str(report)
    assert f"selects whole positions, the same in every one of the {FRAMES} frames" in str(report)
    check_sparse_model(model, inputs_for(batch), 2)


def test_every_frame_selects_the_same_positions_whatever_group_is_asked():
    model, inputs = stdit(einops=True), inputs_for(1)
    torch._dynamo.reset()
    be = astraea.backend(schedule=[1.0, 0.5, 0.3], group="token")
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        compiled(*inputs(0))
        checker = be.runners[0].graph_fn = ContractChecker(be.runners[0])
        for step in (1, 2):
            compiled(*inputs(step))
    torch._dynamo.reset()
    assert checker.selected
    for indices in checker.selected:
        for idx in indices:
            rows = idx[0].view(FRAMES, -1)  # frame-major: each frame's rows, then the next frame's
            assert (rows // POSITIONS == torch.arange(FRAMES)[:, None]).all()
            assert (rows % POSITIONS == rows[0] % POSITIONS).all()


def test_inductor_lowering_and_skips_equal_the_eager_lowering():
    model, inputs = stdit(einops=True), inputs_for(2)
    outs = {}
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        be = astraea.backend(schedule=[1.0, 0.5, 0.0, 0.25, 0.75], lowering=lowering)
        compiled = torch.compile(model, backend=be)
        with torch.no_grad():
            outs[lowering] = [compiled(*inputs(step)) for step in range(5)]
    torch._dynamo.reset()
    for got, expected in zip(outs["inductor"], outs["eager"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
