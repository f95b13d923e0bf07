"""How the rewritten graph runs: eagerly, or through Inductor with the selection size symbolic;
region by region (each distinct block lowered once), or as one whole graph.

Inductor generates fused Triton for everything token-wise and calls our two custom ops
(`astraea::sparse_attention`, `astraea::merge_rows`) in between. The number of selected
tokens K is the only size that changes from step to step, so the graph is compiled once
with K symbolic (the selection indices are fake tensors of a dynamic length): one compiled
variant serves every budget. The compiled code is called from the runner, outside dynamo,
so nothing re-checks guards; the runner keeps K >= 2, the range the symbol was compiled for.

Regional lowering (the default) cuts the graph at the blocks' ends (`passes/regions.py`) and
lowers each distinct block once: every block of a stack runs the same compiled code with its
own weights, caches and selection, so lowering costs one block, not thirty. Every block's
selection shares the one symbol K (as the runner selects the same number for every block),
which is what makes their regions equal. What is not a
block (the embeddings, the glue between two stacks, the output head) runs as traced, as it
does under diffusers' `compile_repeated_blocks()`: lowering it would cost seconds of compile
for little (measured in benchmarks/NOTES.md).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import operator
import time
import warnings

from typing import Callable

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .config import AstraeaConfig, AstraeaWarning, error_summary
from .ops.signature import SparseBlockInputs
from .kernels import layout as astraea_layout
from .ops import sparse as astraea_ops_sparse, ulysses as astraea_ops_ulysses
from .ops.sparse import GRAPH_FUNCTIONS
from .passes.regions import Region, cut
from .runtime import forecast
from .runtime.state import BlockState, cache_dtype

log = logging.getLogger("astraea")  # its handler: astraea.backend


def lower(
    gm: fx.GraphModule, config: AstraeaConfig, example_inputs: list, blocks: list[SparseBlockInputs], device: torch.device,
    slope_inputs: tuple[str, ...] = (),
) -> Callable:
    """`blocks`: the sparse blocks, whose runtime state the rewrite appended to the inputs;
    `slope_inputs`: what a form of the graph that uses the forecasts' slopes takes of each
    block after them (ops/signature.py)."""
    use_inductor = config.lowering == "inductor" or (config.lowering == "auto" and device.type == "cuda")
    if not config.regional:
        if not use_inductor:
            return gm
        fake_mode, fakes = _fakes(config, example_inputs, blocks, device, slope_inputs)
        return _inductor(gm, fakes, fake_mode, what=f"{len(gm.graph.nodes)} nodes")
    regions = cut(gm.graph)
    firsts: dict[str, Region] = {}
    for r in regions:
        firsts.setdefault(r.key, r)
    lowered = [r for r in firsts.values() if use_inductor and r.is_block]
    log.info("%d regions, %d distinct, %d to lower", len(regions), len(firsts), len(lowered))
    if lowered:
        fake_mode, fakes = _fakes(config, example_inputs, blocks, device, slope_inputs)
        _propagate(gm, fake_mode, fakes, until=lowered[-1].nodes[-1])
    distinct: dict[str, Callable] = {key: r.module(gm) for key, r in firsts.items()}
    for r in lowered:
        what = f"a block of {len(r.nodes)} nodes ({sum(x.key == r.key for x in regions)} alike)"
        distinct[r.key] = _inductor(distinct[r.key], [a.meta["val"] for a in r.inputs], fake_mode, what)
    return RegionalGraph(gm, regions, distinct)


def _propagate(gm: fx.GraphModule, fake_mode: FakeTensorMode, fakes: list, until: fx.Node) -> None:
    """Fake values (`meta["val"]`, with K symbolic) of the graph's nodes up to `until`: what
    the regions lowered take as inputs."""
    prop = FakeTensorProp(gm, mode=fake_mode)
    prop.env, prop.args_iter = {}, iter(fakes)
    with fake_mode:
        for n in gm.graph.nodes:
            prop.env[n] = prop.run_node(n)
            if n is until:
                return


# The selected rows' count takes its symbol's name from this source: the same name in every
# lowering, so that lowering the same graph again in one process finds it in torch's caches.
_ROWS = ConstantSource("astraea_selected_rows")


def _fakes(config, example_inputs, blocks, device, slope_inputs=()):
    """Fake inputs of the rewritten graph: the model's, then each block's runtime inputs with
    idx [S, K] of one symbolic K for all blocks (hinted below N), as the runner selects; then
    each block's `slope_inputs` (a span is [S, K] too)."""
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t for t in example_inputs]
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC], constraint_sizes=[None] * 2)
    hint = torch.arange(max(2, blocks[0].shape[1] // 2), device=device).expand(blocks[0].samples, -1).contiguous()
    k = fake_mode.from_tensor(hint, symbolic_context=dynamic, source=_ROWS).shape[1]
    states, spans = [], []
    for b in blocks:
        with fake_mode:
            idx = torch.empty((b.samples, k), dtype=torch.int64, device=device)
            states.append(BlockState.allocate(b.shape, cache_dtype(config, b.dtype), device, b.samples))
            spans.append(torch.empty(idx.shape, dtype=torch.float32, device=device))
        fakes += states[-1].graph_inputs(idx)
    if slope_inputs:
        with fake_mode:
            forecast.allocate(states)
        fakes += [t for state, span in zip(states, spans) for t in state.slope_inputs(slope_inputs, span)]
    return fake_mode, fakes


def _inductor(gm: fx.GraphModule, fakes: list, fake_mode: FakeTensorMode, what: str) -> Callable:
    """`gm` lowered by Inductor; where Inductor fails on it (a bug of its own for some graph, or a
    compiler it cannot run), `gm` itself, which runs eagerly with the same results, and a warning
    saying so. Inductor gets a copy of the graph, as its passes edit the graph they are given."""
    started = time.perf_counter()
    log.info("lowering %s with Inductor", what)  # before Inductor's import, which takes seconds the first time
    from torch._inductor.compile_fx import compile_fx

    _cacheable(gm)
    try:
        with torch._guards.tracing(torch._guards.TracingContext(fake_mode)), torch.compiler.config.patch(
                cache_key_tag=f"{torch.compiler.config.cache_key_tag}{_OPS_TAG}"):
            compiled = compile_fx(_copy(gm), fakes)
    except Exception as e:  # noqa: BLE001 - any failure of Inductor's leaves the graph to run eagerly
        warnings.warn(f"astraea: {LOWERING_FAILED} {what} ({error_summary(e)}); it runs eagerly instead: the same "
                      "results, without Inductor's fused kernels", AstraeaWarning, stacklevel=2)
        return gm
    log.info("lowered in %.1f s", time.perf_counter() - started)
    return compiled


LOWERING_FAILED = "Inductor could not lower"  # the start of the warning when it fails


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` on a copy of its graph, for passes that edit it: each node's metadata copied shallowly, the
    module's metadata and weights shared."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    copied.meta.update(gm.meta)
    return copied


# Torch's caches key a graph by its code, which names the library's ops but not what their fake
# kernels say of their outputs: code lowered by an earlier version of them would load and fail
# its checks of the outputs' strides. Their source, hashed into torch's cache key tag while
# lowering, keeps each version's code apart.
_OPS_TAG = "astraea-ops-" + hashlib.sha256("".join(
    inspect.getsource(m) for m in (astraea_ops_sparse, astraea_ops_ulysses, astraea_layout)).encode()).hexdigest()[:16]


def _cacheable(gm: fx.GraphModule) -> None:
    """Let torch's on-disk caches keep what Inductor makes of `gm` (a second process then
    loads it instead of compiling): AOTAutograd's cache takes a graph whose functions it
    knows, so ours are marked, keyed by their source (a change to them is a new key), and
    reads a method's receiver as a tensor where the node has dynamo's value, which the
    rewrite's new nodes get from the propagated one."""
    marked = torch._inductor.config.unsafe_marked_cacheable_functions
    for fn in GRAPH_FUNCTIONS:
        marked[f"{fn.__module__}.{fn.__name__}"] = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    for n in gm.graph.nodes:
        if "example_value" not in n.meta and "val" in n.meta:
            n.meta["example_value"] = n.meta["val"]


class RegionalGraph:
    """The rewritten graph run region by region: each region calls the lowered code of its key
    with its own inputs. A value is dropped after the last region that reads it, so the peak
    memory is that of the whole graph run at once."""

    def __init__(self, gm: fx.GraphModule, regions: list[Region], lowered: dict[str, Callable]):
        self.graph_module = gm  # the whole graph the regions were cut from
        slot: dict[fx.Node, int] = {}
        self.num_inputs = 0
        self.constants: list[tuple[int, object]] = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                slot[n] = len(slot)
                self.num_inputs += 1
            elif n.op == "get_attr":
                slot[n] = len(slot)
                self.constants.append((slot[n], operator.attrgetter(n.target)(gm)))
        for r in regions:
            for o in r.outputs:
                slot[o] = len(slot)
        self.num_slots = len(slot)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
        self.results = [(slot[a], None) if isinstance(a, fx.Node) else (None, a) for a in results]
        returned = {s for s, _ in self.results}
        last_read = {}
        for i, r in enumerate(regions):
            for a in r.inputs:
                last_read[slot[a]] = i
        self.steps = []
        for i, r in enumerate(regions):
            drop = tuple(s for s in (slot[a] for a in r.inputs) if last_read[s] == i and s not in returned
                         and s >= self.num_inputs)
            self.steps.append((lowered[r.key], tuple(slot[a] for a in r.inputs), tuple(slot[o] for o in r.outputs), drop))
        self.num_regions = len(regions)
        self.num_lowered = len(lowered)  # distinct regions: each lowered once

    def __call__(self, *args):
        env = [*args, *([None] * (self.num_slots - len(args)))]
        for at, value in self.constants:
            env[at] = value
        for fn, reads, writes, drop in self.steps:
            values = fn(*[env[s] for s in reads])
            for s, v in zip(writes, values):
                env[s] = v
            for s in drop:
                env[s] = None
        return tuple(env[s] if s is not None else value for s, value in self.results)
