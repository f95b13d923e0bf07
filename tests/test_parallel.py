"""Sequence parallelism on CPU: two gloo processes run the same code a GPU job runs.

At budget 1.0 the two-rank astraea model equals the dense single-process model, and so does
classifier-free guidance split over the ranks; at budget r it equals single-process astraea
making the same selection (k / 2 tokens from each half of the tokens, as each rank does from
its shard). A head count the Ulysses degree does not split is refused.
"""

from __future__ import annotations

import os
import socket
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import astraea
import astraea.parallel
from astraea.flops import counting
from astraea.passes.ulysses import collapse_ulysses_attention
from astraea.runtime import runner as runner_module
from astraea.runtime.select import select as select_tokens
from tests.models import sample, wan

# 32 tokens, 16 per rank: as many as the head width and half the timestep frequencies, so the
# analysis must tell the token axis from channel axes of the same size.
SHAPE = dict(frames=2, size=8)
SPARSE = [1.0, 0.5, 0.0, 0.25]  # the skipped step reuses the block caches of each rank's shard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_astraea(schedule, flops=None, **parallel):
    torch._dynamo.reset()
    family = wan(**SHAPE)
    mesh = astraea.parallel.enable(family.model, **parallel)
    be = astraea.backend(schedule=schedule)
    compiled = torch.compile(family.model, backend=be)
    if flops is not None:  # count every call after the first (which builds the runner)
        with torch.no_grad():
            family.call(compiled, torch.randn(family.latent_shape), torch.tensor([1.0]), family.conditions[0])
        be.runners[0].graph_fn = counting(be.runners[0].graph_fn, flops)
        be.runners[0].reset()
    out = sample(family, compiled, mesh=mesh)
    assert len(be.reports) == 1, "the model was traced as one graph"
    return out, [(r.step, r.branch, r.tokens) for r in be.runners[0].records], be.reports[0]


def _run_compile_blocks(schedule, **parallel):
    torch._dynamo.reset()
    family = wan(**SHAPE)
    mesh = astraea.parallel.enable(family.model, **parallel)
    be = astraea.compile_blocks(family.model, schedule=schedule)
    out = sample(family, family.model, mesh=mesh)
    return out, [(r.step, r.branch, r.tokens) for r in be.runners[0].records]


def _rank_main(rank: int, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    found = {}
    found["dense"], _, _ = _run_astraea([1.0] * 4, ulysses=2)
    found["flops"] = []
    found["sparse"], found["records"], report = _run_astraea(SPARSE, found["flops"], ulysses=2)
    found["sparse_blocks"], found["hash"], found["report"] = report.num_sparse_blocks, report.structure_hash, str(report)
    found["blocks"], found["blocks_records"] = _run_compile_blocks(SPARSE, ulysses=2)
    found["collapsed"] = _collapsed_against_engine()
    family = wan(**SHAPE)
    found["cfg"] = sample(family, family.model, mesh=astraea.parallel.enable(family.model, cfg=2))
    try:
        astraea.parallel.enable(wan(heads=3).model, ulysses=2)
    except astraea.ConfigError as e:
        found["heads_error"] = str(e)
    torch.save(found, f"{results}.{rank}")
    dist.destroy_process_group()


def _collapsed_against_engine():
    """(ranks, largest difference): the graph with Ulysses attention collapsed into one op,
    run as is, against the model under diffusers' own exchange."""
    torch._dynamo.reset()
    family = wan(**SHAPE)
    astraea.parallel.enable(family.model, ulysses=2)
    found = {}

    def collapse_and_run(gm, example_inputs):
        found["ranks"] = collapse_ulysses_attention(gm)
        return gm.forward

    x, t = torch.randn(family.latent_shape, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    with torch.no_grad():
        engine = family.call(family.model, x, t, family.conditions[0])
        collapsed = family.call(torch.compile(family.model, backend=collapse_and_run), x, t, family.conditions[0])
    return found["ranks"], float((collapsed - engine).abs().max())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("parallel") / "rank")
    mp.spawn(_rank_main, args=(_free_port(), path), nprocs=2)
    return [torch.load(f"{path}.{r}") for r in range(2)]


def _by_shards(shards: int):
    """The runner's selection made as `shards` ranks make it: k / shards tokens from each
    contiguous shard of the tokens, each rank's own."""

    def select(score, k, config, grid):
        width = score.shape[-1] // shards
        parts = score.chunk(shards, -1)
        return torch.cat([select_tokens(p, k // shards, config, None) + i * width for i, p in enumerate(parts)], -1)

    return select


def _single(schedule, shards=1, flops=None):
    """A single process's sample, selecting as a run over `shards` ranks does."""
    torch._dynamo.reset()
    family = wan(**SHAPE)
    be = astraea.backend(schedule=schedule)
    compiled = torch.compile(family.model, backend=be)
    with torch.no_grad():
        family.call(compiled, torch.randn(family.latent_shape), torch.tensor([1.0]), family.conditions[0])
    runner = be.runners[0]
    if flops is not None:
        runner.graph_fn = counting(runner.graph_fn, flops)
    runner.reset()
    with mock.patch.object(runner_module, "select", _by_shards(shards)):
        return sample(family, compiled), be.reports[0]


@pytest.fixture(scope="module")
def dense():
    """The dense single-process model's sample: what every layout must reproduce."""
    family = wan(**SHAPE)
    return sample(family, family.model)


@pytest.mark.parametrize("run", ["dense", "cfg"])  # astraea at budget 1 / guidance split over ranks
def test_equals_dense_single_process(ranks, dense, run):
    for r in ranks:
        torch.testing.assert_close(r[run], dense, rtol=1e-5, atol=1e-5)


def test_budget_r_equals_single_process_with_the_same_selection(ranks):
    flops = []
    single, report = _single(SPARSE, shards=2, flops=flops)
    assert ranks[0]["sparse_blocks"] == report.num_sparse_blocks == 2
    assert ranks[0]["hash"] == report.structure_hash  # schedules and cost tables carry over
    assert "16 tokens per rank (Ulysses over 2 ranks)" in ranks[0]["report"]
    for r in ranks:
        torch.testing.assert_close(r["sparse"], single, rtol=1e-4, atol=1e-5)
    # each rank computes its share: all 16 of its tokens, then half, none, a quarter
    tokens = {step: t for step, ctx, t in ranks[0]["records"] if ctx == 0}
    assert tokens == {0: 16, 1: 8, 2: 0, 3: 4}
    assert ranks[0]["records"] == ranks[1]["records"]
    # each rank does about half the work of every call; a little more, as the text keys and
    # values of cross-attention and the timestep embedding are computed on every rank
    for rank, whole in zip(ranks[0]["flops"], flops):
        assert 0.5 <= rank / whole <= 0.6


def test_selection_differs_from_unbalanced_single_process(ranks):
    """The equality above is not vacuous: global top-k selects differently."""
    single, _ = _single(SPARSE, shards=1)
    assert (ranks[0]["sparse"] - single).abs().max() > 1e-4


def test_collapsed_ulysses_attention_equals_the_engines_exchange(ranks):
    for r in ranks:
        found_ranks, difference = r["collapsed"]
        assert found_ranks == 2 and difference < 1e-5


def test_heads_that_do_not_split_are_refused(ranks):
    assert "3 attention heads do not split over a Ulysses degree of 2" in ranks[0]["heads_error"]


def test_compile_blocks_under_ulysses_equals_the_whole_model_compile(ranks):
    """Each block compiled on its own runs inside diffusers' context parallelism as the whole
    model's compile does: the same selection on each rank's shard, the same latents."""
    for r in ranks:
        assert r["blocks_records"] == r["records"][-len(r["blocks_records"]):]  # after the compiling call
        torch.testing.assert_close(r["blocks"], r["sparse"], rtol=0, atol=0)
