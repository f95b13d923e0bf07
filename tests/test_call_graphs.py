"""On a GPU, sparse calls replayed as CUDA graphs give exactly what uncaptured calls give.

Runs where CUDA is (the GPU machine); skipped elsewhere, where the runner never captures.
"""

import pytest
import torch

import astraea
from tests.models import wan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

SCHEDULE = [1.0, 0.5, 0.5, 0.25, 0.5, 0.0, 0.25, 1.0, 0.5, 0.5]


def generate(family, model, seed: int, steps: int = len(SCHEDULE), guidance: float = 3.0) -> torch.Tensor:
    """Euler steps with guidance, cond then uncond, on the GPU; a fresh latent tensor per call."""
    x = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(seed)).cuda()
    cond, uncond = (c.cuda() for c in family.conditions)
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(1000, 1000 / steps, steps)):
            t = t.reshape(1).cuda()
            v_cond, v_uncond = (family.call(model, x.clone(), t, e) for e in (cond, uncond))
            x = x - (1 / steps) * (v_uncond + guidance * (v_cond - v_uncond))
    return x


def test_captured_calls_equal_uncaptured_ones():
    family = wan(frames=3, size=16)
    family.model.cuda()
    runs, runners = {}, {}
    for graphs in (False, True):
        torch._dynamo.reset()
        be = astraea.backend(schedule=SCHEDULE, cuda_graphs=graphs)
        compiled = torch.compile(family.model, backend=be)
        runs[graphs] = [generate(family, compiled, seed) for seed in (0, 1, 2)]
        runners[graphs] = be.runners[0]
    captured, calls = runners[True].call_graphs, len(runners[True].records)
    # 2 branches x 4 selection sizes (0.5, 0.25, dense, and a skip's none: with skip="blocks",
    # the default, a skip runs the skip graph, replayed too), each captured on its second call
    # (again if an input it read in place moved); every call after that replays.
    assert len(captured.graphs) == 8 and captured.captures >= 8
    assert captured.replays == calls - len(captured.seen) and captured.replays > calls // 2
    assert runners[False].call_graphs.replays == 0
    assert [r.tokens for r in runners[True].records] == [r.tokens for r in runners[False].records]
    # Not bit for bit in fp32: cuBLAS may pick other kernels inside a capture (measured on an
    # H200: 2.4e-5 at most over 3 generations). A replay reading stale inputs or state would
    # be off by the size of the values themselves. (bf16 Wan2.1-1.3B shape: bit for bit,
    # benchmarks/results/call_overhead_wan2.1-1.3b.md.)
    for with_graphs, without in zip(runs[True], runs[False]):
        torch.testing.assert_close(with_graphs, without, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("options", [dict(policy="random"), dict(group="spatial")])
def test_random_policy_and_spatial_groups_run_uncaptured(options):
    family = wan(frames=3, size=16)
    family.model.cuda()
    torch._dynamo.reset()
    be = astraea.backend(schedule=SCHEDULE, **options)
    generate(family, torch.compile(family.model, backend=be), 0)
    assert be.runners[0].call_graphs.captures == 0 and be.runners[0].call_graphs.replays == 0
