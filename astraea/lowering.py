"""How the rewritten graph runs: eagerly, or through Inductor with the selection size symbolic.

Inductor generates fused Triton for everything token-wise and calls our two custom ops
(`astraea::sparse_attention`, `astraea::merge_rows`) in between. The number of selected
tokens K is the only size that changes from step to step, so the graph is compiled once
with K symbolic (the selection indices are fake tensors of a dynamic length): one compiled
variant serves every budget. The compiled code is called from the runner, outside dynamo,
so nothing re-checks guards; the runner keeps K >= 2, the range the symbol was compiled for.
"""

from __future__ import annotations

import logging
import time

from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from .config import AstraeaConfig
from .ops.signature import SparseBlockInputs
from .runtime.state import BlockState, cache_dtype

log = logging.getLogger("astraea")  # its handler: astraea.backend


def lower(
    gm: fx.GraphModule, config: AstraeaConfig, example_inputs: list, blocks: list[SparseBlockInputs], device: torch.device
) -> Callable:
    """`blocks`: the sparse blocks, whose runtime state the rewrite appended to the inputs."""
    use_inductor = config.lowering == "inductor" or (config.lowering == "auto" and device.type == "cuda")
    if not use_inductor:
        return gm
    from torch._inductor.compile_fx import compile_fx

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    # idx is [S, K]: S fixed per block, K a symbol (hinted below N).
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC], constraint_sizes=[None] * 2)
    for b in blocks:
        hint = torch.arange(max(2, b.shape[1] // 2), device=device).expand(b.samples, -1).contiguous()
        with fake_mode:
            state = BlockState.allocate(b.shape, cache_dtype(config, b.dtype), device, b.samples)
        fakes += state.graph_inputs(fake_mode.from_tensor(hint, symbolic_context=dynamic))
    started = time.perf_counter()
    log.info("lowering %d nodes with Inductor (the long part of a compile)", len(gm.graph.nodes))
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        compiled = compile_fx(gm, fakes)
    log.info("lowered in %.1f s; budgets change per step without compiling again", time.perf_counter() - started)
    return compiled
