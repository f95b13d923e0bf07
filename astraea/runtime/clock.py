"""Step placement for blocks compiled on their own (`astraea.compile_blocks`).

A block's graph has no timestep input, and dynamo compiles one graph for every instance of a
block class (their weights are inputs). So the model's own call is placed once, by a forward
pre-hook on the model (`StepClock`), and each compiled block graph hands its calls to one
runner per instance (`BlockInstances`), told apart by the instance's own weight tensor (a
graph dynamo specialised to one instance, holding its weights as constants, serves only it).
Only the blocks over the most tokens, the video's, select; a stack over fewer (a text
refiner, text-only blocks) computes every token, as it does in a whole-model compile where
the token axis is the video's.

Dynamo guards a block's graph on its inputs' strides, even along dimensions of size 1. A
sparse step's outputs can be slices whose strides follow the step's selection size, so a
block's outputs are given dense strides: the next block then sees the same strides at every
budget, and nothing recompiles. Where a block still runs through different graphs from call
to call (a skipped step returns other strides than a computed one), its caches are the
clock's, shared by every graph's runner for that block.

With skip="output" a skipped call must not run the model at all, so the clock also wraps the
model's forward: a budget-0 call returns the branch's previous output (each block runner told
it was skipped, so its staleness counts on as in a whole-model compile), any other call runs
and its output is kept. The block runners themselves run with skip="blocks": a block keeps
no output of its own.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from torch.utils._pytree import tree_map_only

from ..config import AstraeaConfig
from .announced import Announcements
from .placement import Placement
from .runner import CallRecord, SparseRunner
from .steps import Call

_log = logging.getLogger("astraea")  # the compile's progress (its handler: astraea.backend)


class StepClock:
    """Places every call of one model; `read_timestep(args, kwargs)` finds the call's
    timestep (None where the model has none, then only announcements place calls)."""

    def __init__(self, announcements: Announcements | None, read_timestep: Callable, config: Callable[[], AstraeaConfig]):
        self.placement = Placement(announcements, lambda: config().schedule)
        self.read_timestep = read_timestep
        self.config = config
        # skip="output": per guidance branch, the last output and the block runners that made it
        self.last_outputs: dict[int, tuple[object, tuple[SparseRunner, ...]]] = {}
        self.ran: list[SparseRunner] = []  # the block runners the current call ran
        self.call: Call | None = None
        self.calls = 0  # model calls placed
        self.block_states: dict = {}  # per block (and cache shapes): its guidance branches' states
        self.instances = 0  # block instances given a runner, each with a random stream of its own
        self._shapes: tuple = ()  # the current call's input shapes
        self._most: dict[tuple, int] = {}  # per input shapes, the most tokens a block ran on: the video's

    def attach(self, model: torch.nn.Module) -> None:
        """Place each call of `model` before it runs, and answer skipped calls (skip="output")."""
        model.register_forward_pre_hook(self._before_call, with_kwargs=True)
        forward = model.forward

        @functools.wraps(forward)
        def placed_forward(*args, **kwargs):
            reused = self._reused_output()
            if reused is not None:
                return reused
            out = forward(*args, **kwargs)
            if self.config().skip == "output":
                self.last_outputs[self.call.branch] = out, tuple(self.ran)
            return out

        model.forward = placed_forward

    def _before_call(self, model, args, kwargs):
        if self.calls == 0:  # dynamo's trace comes next, seconds before the analysis says anything
            _log.info("first call: dynamo traces each kind of block, then astraea analyses and lowers it (loaded "
                      "from torch's caches where an earlier process lowered it)")
        self.call = self.placement.place(lambda: self.read_timestep(args, kwargs))
        if self.call.new_generation:
            self.last_outputs.clear()
        self.ran = []
        self.calls += 1
        self._shapes = tuple(tuple(a.shape) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))

    def _reused_output(self):
        """The branch's previous output (a copy) where this call is skipped with skip="output";
        None where the model must run."""
        call, config = self.call, self.config()
        if config.skip != "output" or call.branch not in self.last_outputs:
            return None
        if config.step_budget(call.step, call.time) != 0.0:
            return None
        out, runners = self.last_outputs[call.branch]
        for runner in runners:
            runner.skip_call(call)
        return tree_map_only(torch.Tensor, torch.clone, out)

    def video_tokens(self, tokens: int) -> int:
        """The most tokens a block has run on in calls with this call's input shapes (the
        video's), counting a block over `tokens` now: a later call at a smaller resolution is
        not measured against a larger one."""
        most = self._most[self._shapes] = max(self._most.get(self._shapes, 0), tokens)
        return most

    @property
    def tokens(self) -> int:
        """The video's tokens in the current call's input shapes (0 before any block ran)."""
        return self._most.get(self._shapes, 0)

    def reset(self) -> None:
        self.placement.reset()
        self.last_outputs.clear()
        self.call = None

    def cache_bytes(self) -> int:
        """The caches and scores of every block, every guidance branch."""
        return sum(s.nbytes() for branches in self.block_states.values() for b in branches.values() for s in b.blocks)


class BlockInstances:
    """Runs the compiled graph of a block class, dispatching each call to its instance's
    runner (its own caches, scores and selection). `weight` is the position of an input that
    is the instance's own parameter (None: the graph holds its weights, so it serves one
    instance); `make_runner(branches, config, instance)` builds a runner on a block's states,
    its random stream the instance's own."""

    def __init__(self, clock: StepClock, report, config, weight: int | None, shapes: tuple,
                 make_runner: Callable[[dict, object, int], SparseRunner]):
        self.clock = clock
        self.report = report
        self._config = config
        self.weight = weight
        self.shapes = shapes  # the cache shapes: one block at another batch size has other caches
        self.make_runner = make_runner
        self.instances: dict[int, SparseRunner] = {}
        self.last_call: dict[int, int] = {}  # per block, the model call it last ran in

    def __call__(self, *args):
        if self.clock.call is None:
            raise RuntimeError(
                "astraea: a block compiled by astraea.compile_blocks was called outside its model's call; "
                "call the model (its forward places the denoising step), not the block"
            )
        block = id(self) if self.weight is None else id(args[self.weight])  # a graph holding its weights serves one block
        if self.last_call.get(block) == self.clock.calls:
            raise RuntimeError(
                "astraea: a block compiled by astraea.compile_blocks ran twice in one call of its model (its weights "
                "are shared), so one cache cannot hold what it adds each time; compile the model whole instead: "
                "torch.compile(model, backend='astraea')"
            )
        self.last_call[block] = self.clock.calls
        runner = self.instances.get(block)
        if runner is None:
            branches = self.clock.block_states.setdefault((block, self.shapes), {})
            runner = self.instances[block] = self.make_runner(branches, _for_blocks(self.config), self.clock.instances)
            self.clock.instances += 1
        full = self.report.num_tokens < self.clock.video_tokens(self.report.num_tokens)  # not the video's tokens
        self.clock.ran.append(runner)
        return tuple(_dense_strides(t) for t in runner.run(self.clock.call, args, full))

    # What a whole-graph runner offers, over all instances.
    @property
    def records(self) -> list[CallRecord]:
        """What each model call did, as the first instance this graph ran did it."""
        return next(iter(self.instances.values())).records if self.instances else []

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, config) -> None:
        self._config = config
        for runner in self.instances.values():
            runner.config = _for_blocks(config)

    def reset(self) -> None:
        for runner in self.instances.values():
            runner.reset()


def _for_blocks(config: AstraeaConfig) -> AstraeaConfig:
    """A block runner's config: skip="output" is answered by the clock, above the blocks, so a
    block keeps no output of its own."""
    return config.replace(skip="blocks") if config.skip == "output" else config


def _dense_strides(t):
    """`t` with the strides of a new tensor of its shape: a view where only dims of size 1
    differ (a batch-1 slice of a joint tensor), a copy only where the memory is laid out
    otherwise."""
    if not isinstance(t, torch.Tensor):
        return t
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    strides = tuple(reversed(strides))
    if t.stride() == strides:
        return t
    if t.is_contiguous():
        return t.as_strided(t.shape, strides, t.storage_offset())
    return t.contiguous()
