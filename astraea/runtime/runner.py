"""The compiled callable dynamo runs in place of the model's graph.

Per call it places the call (step, guidance branch), looks up the step's budget, selects each
sparse block's tokens from the branch's scores, and runs the rewritten graph with the
indices and the branch's caches as extra inputs; on a GPU the selection and the graph are
replayed as one CUDA graph per selection size (`call_graphs.py`). A budget-0 step runs the
graph's whole-step-skip form (`passes/skip.py`, lowered on first use), or with the option
skip="output" returns the branch's previous output without running anything (under
`compile_blocks` the model's clock does, before any block runs). Budgets and
indices are tensors and host ints here, outside dynamo, so they never cause a recompile.
"""

from __future__ import annotations

import dataclasses
import warnings

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ..config import AstraeaConfig, AstraeaWarning
from ..ops.signature import MERGE_SLOPE_INPUTS, SKIP_SLOPE_INPUTS, SparseBlockInputs
from ..passes import Report
from . import forecast
from .call_graphs import CallGraphs
from .placement import Placement
from .select import mark_selected, num_selected, scores, select
from .state import BlockState, BranchState, cache_dtype
from .steps import Call


RECORDS_KEPT = 10_000  # call records a runner keeps: 50 generations of 100 calls


@dataclass(frozen=True)
class CallRecord:
    """What one call did: for tests, benchmarks and the demo's budget plot."""

    step: int
    branch: int  # the guidance branch (0: the first call of a step, e.g. cond)
    budget: float
    tokens: int  # tokens recomputed per sparse block (0 for a skipped step)


class SparseRunner:
    """Runs a rewritten graph (`graph_fn`, e.g. the GraphModule or its Inductor compilation)
    for calls placed elsewhere (`run`): by `PlacedRunner` below, or by the model's clock under
    `compile_blocks` (`clock.py`)."""

    def __init__(
        self,
        graph_fn: Callable,
        dense_gm: fx.GraphModule,
        report: Report,
        blocks: list[SparseBlockInputs],
        config: AstraeaConfig,
        device: torch.device,
        lower_skip: Callable[[bool], Callable],
        lower_slopes: Callable[[bool], Callable],
        cuda_graphs: bool = True,
        branches: dict[int, BranchState] | None = None,
        stream: int = 0,
    ):
        self.graph_fn = graph_fn
        self.lower_skip = lower_skip  # (forecasts) -> the whole-step-skip graph, copying or forecasting
        self.lower_slopes = lower_slopes  # (forecasts) -> the sparse graph keeping the slopes, copying or forecasting
        self.dense_gm = dense_gm  # the graph before the rewrite, kept for checks and explain
        self.report = report
        self.blocks = blocks
        self.config = config
        self.device = device
        self.num_tokens = report.num_tokens
        # The indices of a dense step, [S, N] for each block's S.
        every = torch.arange(self.num_tokens, device=device)
        self.all_tokens = [every.expand(b.samples, -1).contiguous() for b in blocks]
        # Per guidance branch; given when another runner may run the same block (`clock.py`).
        self.branches: dict[int, BranchState] = {} if branches is None else branches
        self.records: list[CallRecord] = []
        # The random policy's stream: `stream` tells apart runners of one model (block instances).
        self.stream = stream
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed + stream)
        # One process on a GPU: replay calls as CUDA graphs (collectives stay uncaptured).
        single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.call_graphs = CallGraphs() if cuda_graphs and device.type == "cuda" and single else None

    # ---- state -----------------------------------------------------------------------------
    def _new_branch(self) -> BranchState:
        return BranchState(
            blocks=[
                BlockState.allocate(b.shape, cache_dtype(self.config, b.dtype), self.device, b.samples) for b in self.blocks
            ]
        )

    def _new_generation(self) -> None:
        # In place: captured call graphs read the states where they are.
        for ctx in self.branches.values():
            ctx.reset()
        self.generator.manual_seed(self.config.seed + self.stream)

    @property
    def config(self) -> AstraeaConfig:
        return self._config

    @config.setter
    def config(self, config: AstraeaConfig) -> None:
        """Selections take whole positions where the model regroups its tokens by frame
        (factorised attention on a flat stream), whatever group the options name."""
        self._config = config.replace(group="spatial") if self.report.whole_positions and config.group != "spatial" \
            else config

    def reset(self) -> None:
        """Forget every branch's history: the next call starts a new generation."""
        self._new_generation()

    def cache_bytes(self) -> int:
        return sum(s.nbytes() for c in self.branches.values() for s in c.blocks)

    # ---- the call --------------------------------------------------------------------------
    def plan(self, call: Call, full: bool = False):
        """(branch state, budget, tokens to select per block: 0 for a skip) of a placed call,
        at budget 1.0 where `full`; host work only."""
        if call.new_generation:
            self._new_generation()
        ctx = self.branches.get(call.branch)
        if ctx is None:
            ctx = self.branches[call.branch] = self._new_branch()
        budget = self.config.step_budget(call.step, call.time)  # raises before any output if the schedule is short
        if full or not ctx.filled:
            budget = 1.0  # nothing cached yet
        if budget == 0.0:
            return ctx, budget, 0
        return ctx, budget, num_selected(budget, self.num_tokens)

    def _slopes(self, ctx: BranchState) -> bool:
        """Whether this call keeps the blocks' slopes: some step may forecast, and the caches
        hold a call."""
        return self.config.forecasts and ctx.filled

    def _forecasting(self, ctx: BranchState, call: Call) -> bool:
        """Whether this call forecasts what it does not recompute (the step's reuse mode)."""
        return self._slopes(ctx) and self.config.step_reuse(call.step, call.time) == "forecast"

    def _forward(self, ctx: BranchState, k: int, inputs: tuple, forecasting: bool) -> tuple[tuple, int]:
        """The device work of a call: select each block's tokens, run the rewritten graph.
        Returns the outputs and the tokens each block recomputed."""
        slopes = self._slopes(ctx)
        indices, extra = [], []
        for state, every in zip(ctx.blocks, self.all_tokens):
            if k < self.num_tokens:  # a dense step needs no scores
                score = scores(state, self.config, self.generator)
                idx = select(score, k, self.config, self.report.token_grid)
            else:
                idx = every
            if slopes:  # the merge refreshes the recomputed rows' slopes over the steps since they were computed
                extra += state.slope_inputs(MERGE_SLOPE_INPUTS, forecast.span(state, idx))
            mark_selected(state, idx)
            indices.append(idx)
        graph = self.lower_slopes(forecasting) if slopes else self.graph_fn
        return _call(graph, ctx, indices, inputs, extra), int(indices[0].shape[-1])

    def _reuse_blocks(self, ctx: BranchState, inputs: tuple, forecasting: bool) -> tuple[tuple, int]:
        """The device work of a skipped step: every block adds its cache (its forecast, when
        forecasting: the skip graph's forecasting form reads the slopes) to its input."""
        extra = [t for state in ctx.blocks for t in state.slope_inputs(SKIP_SLOPE_INPUTS)] if forecasting else []
        return _call(self.lower_skip(forecasting), ctx, self.all_tokens, inputs, extra), 0

    def _record(self, record: CallRecord) -> None:
        """Keep what the call did; the oldest records go past RECORDS_KEPT, so that a
        long-running server's runner does not grow."""
        self.records.append(record)
        if len(self.records) > RECORDS_KEPT:
            del self.records[: len(self.records) - RECORDS_KEPT]

    def _graph_key(self, branch: int, k: int, slopes: bool, forecasting: bool):
        """The key of a call's captured graph, or None where a call runs uncaptured: the random
        policy draws from a generator, and only single-token selection has been checked
        captured on a GPU ("run" and "spatial" groups are untested there)."""
        c = self.config
        if self.call_graphs is None or not c.cuda_graphs or c.policy == "random" or c.group != "token":
            return None
        return branch, k, c.policy, c.weight_signal, c.weight_penalty, slopes, forecasting

    def run(self, call: Call, args: tuple, full: bool = False) -> tuple:
        """Run a placed call (placed by this runner, or by the model's clock); every token where
        `full`."""
        ctx, budget, k = self.plan(call, full)
        slopes = self._slopes(ctx)
        forecasting = k < self.num_tokens and self._forecasting(ctx, call)  # a dense call reads no cache
        if slopes:
            forecast.allocate(ctx.blocks)  # before any capture: graphs read the slopes where they are
        if k == 0 and self.config.skip == "output":
            self.skip_call(call)
            return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in ctx.last_output)
        if k == 0:
            _one_step_staler(ctx)
            run = lambda inputs: self._reuse_blocks(ctx, inputs, forecasting)  # noqa: E731
        else:
            run = lambda inputs: self._forward(ctx, k, inputs, forecasting)  # noqa: E731
        key = self._graph_key(call.branch, k, slopes, forecasting)
        out, tokens = run(args) if key is None else self.call_graphs(key, run, args)
        self._record(CallRecord(call.step, call.branch, budget, tokens))
        ctx.filled = True
        ctx.last_output = out if self.config.skip == "output" else None
        return out

    def skip_call(self, call: Call) -> None:
        """A placed budget-0 call answered with the branch's previous output, here or by the
        model's clock above this block (`compile_blocks`): nothing runs, the blocks grow one
        step staler."""
        _one_step_staler(self.branches[call.branch])
        self._record(CallRecord(call.step, call.branch, 0.0, 0))


def _one_step_staler(ctx: BranchState) -> None:
    """A skipped step: every block's tokens one step staler, in one launch, not one per block."""
    torch._foreach_add_([state.stale for state in ctx.blocks], 1)


def _call(graph: Callable, ctx: BranchState, indices: list, inputs: tuple, slope_inputs: list) -> tuple:
    """Run a form of the rewritten graph: the model's inputs, then each block's runtime inputs,
    then what a form that uses the slopes takes of each block (`slope_inputs`, in order)."""
    extra = [t for state, idx in zip(ctx.blocks, indices) for t in state.graph_inputs(idx)]
    out = graph(*inputs, *extra, *slope_inputs)
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class PlacedRunner(SparseRunner):
    """A runner that places its own calls (the graph of a whole model under `torch.compile`):
    from the timestep input at `timestep_position` and what `announcements` hear."""

    def __init__(self, *args, timestep_position: int | None, announcements, **kwargs):
        super().__init__(*args, **kwargs)
        self.timestep_position = timestep_position
        self.placement = Placement(announcements, lambda: self.config.schedule)
        self._unplaced_warned = False

    def reset(self) -> None:
        self.placement.reset()
        super().reset()

    def _unannounced(self) -> bool:
        heard = self.placement.announcements
        return heard is None or heard.current() is None

    def __call__(self, *args):
        heard = self.placement.announcements
        # without a timestep input, the one an earlier graph of this announced call took (a split model)
        value = (args[self.timestep_position] if self.timestep_position is not None
                 else heard.noted_timestep() if heard is not None else None)

        def timestep() -> float | None:  # per-token times: the noisiest
            return None if value is None else float(value.max())

        if value is None and not self._unplaced_warned and self._unannounced():
            self._unplaced_warned = True  # only an attached model's graph without a timestep gets here
            warnings.warn("astraea: this graph takes no timestep and its call was not announced by a pipeline "
                          "(cache_context with step_index), so each such call is placed as a step of its own; call "
                          "the model through its pipeline, or compile it with astraea.compile_blocks",
                          AstraeaWarning, stacklevel=2)

        call = self.placement.place(timestep)
        if self.placement.moved is not None and self.records:
            moved = self.placement.moved
            self.records[-1] = dataclasses.replace(self.records[-1], step=moved.step, branch=moved.branch)
        return self.run(call, args)
