"""The `torch.compile` backend: analyse, rewrite, lower, and hand dynamo a runner.

`torch.compile(model, backend="astraea", options={...})` reaches `astraea_backend` through
the `torch_dynamo_backends` entry point; `astraea.backend(config)` gives the same backend
with a config object, and keeps the runners it builds so callers can inspect them.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .config import AstraeaConfig, AstraeaWarning, ConfigError, error_summary
from .lowering import lower
from .passes import AnalyseTokens, SparsifyBlocks
from .passes.skip import reuse_blocks
from .passes.slopes import keep_slopes
from .passes.timestep import named_as_time
from .passes.token_axis import is_module_state
from .ops.signature import MERGE_SLOPE_INPUTS, SKIP_SLOPE_INPUTS


def _progress_log() -> logging.Logger:
    """The logger compile progress goes to: "astraea", printing to stderr unless the user gave
    it a handler or a level (`logging.getLogger("astraea").setLevel(logging.WARNING)` quiets it)."""
    log = logging.getLogger("astraea")
    if not log.handlers and log.level == logging.NOTSET:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


_log = _progress_log()

# Options the lowered graph depends on; the others are read per call.
COMPILED_OPTIONS = ("lowering", "cache_dtype", "regional")


# Token counts each model (by structure hash) was compiled sparse at in this process, so that a
# later compile of the same model that falls back to dense at another shape says so.
_SPARSE_SHAPES: dict[str, int] = {}


class Backend:
    """A configured astraea backend; `runners` holds one runner per compiled graph."""

    def __init__(self, config: AstraeaConfig):
        self.config = config
        self.clock = None  # set by astraea.compile_blocks: the graphs are blocks, placed by the model's clock
        self.runners: list = []
        self.reports: list = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **kwargs):
        return compile_graph(gm, example_inputs, self.config, self)

    def update(self, **options) -> None:
        """Use other options from the next generation on; nothing recompiles.

        Everything but `lowering`, `cache_dtype` and `regional` is read per call (schedule, token selection,
        full steps, seed), so one compilation serves them all. Refused, before any change, for
        an option fixed in a compiled graph or a schedule made for another model.
        """
        config = self.config.replace(**options)
        if self.runners:
            fixed = [name for name in COMPILED_OPTIONS if getattr(config, name) != getattr(self.config, name)]
            if fixed:
                raise ConfigError(
                    f"option(s) {fixed} are compiled into the graph; compile again to change them "
                    "(torch._dynamo.reset(), then torch.compile with a new backend)"
                )
        for runner in self.runners:
            check_report(config, runner.report, whole_model=self.clock is None)
        self.config = config
        if self.clock is not None:
            self.clock.reset()
        for runner in self.runners:
            runner.config = config
            runner.reset()

    def set_schedule(self, schedule) -> None:
        """Use another schedule from the next generation on (accepts what the `schedule`
        option accepts); nothing recompiles."""
        self.update(schedule=schedule)

    def __repr__(self) -> str:
        return f"astraea.backend({self.config!r})"


def backend(config: AstraeaConfig | None = None, **options) -> Backend:
    """A backend for `torch.compile(model, backend=astraea.backend(cfg))`.

    Pass a config, or options as keywords (`astraea.backend(schedule=0.5)`).
    """
    if config is not None and options:
        raise ConfigError("pass either a config or keyword options, not both")
    return Backend(config if config is not None else AstraeaConfig.from_options(options))


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Let astraea hear the steps and branches a diffusers pipeline announces to `model`
    (`cache_context("cond", step_index=i, num_inference_steps=n)`), from the first call on:
    `torch.compile(astraea.attach(pipe.transformer), backend="astraea")`. Without it, steps and
    branches are inferred from the timestep. `compile_blocks` and `tune` attach by themselves."""
    from .runtime.announced import listen

    if listen(model) is None:
        raise ConfigError(f"{type(model).__name__} has no cache_context, so no pipeline announces its steps to it; "
                          "compile it without attach: its steps are placed by its timestep")
    return model


def astraea_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None):
    """Entry point of `backend="astraea"`; `options` come from torch.compile(options=...)."""
    return compile_graph(gm, example_inputs, AstraeaConfig.from_options(options))


def check_report(config: AstraeaConfig, report, whole_model: bool = True) -> None:
    """Refuse options this analysed graph cannot honour (before compiling, or changing them).
    A schedule's model is checked against a whole model's graph, not a block's."""
    if whole_model:
        config.schedule.check_model(report.structure_hash)
    searched = config.schedule.searched_option("skip")
    if searched is not None and searched != config.skip:
        warnings.warn(f"astraea: this schedule was searched with skip={searched!r} but runs with skip={config.skip!r}, "
                      f"so its searched fidelity does not apply; pass skip={searched!r} to run it as searched",
                      AstraeaWarning, stacklevel=3)
    if config.group == "spatial" and report.num_sparse_blocks and report.token_grid is None:
        raise ConfigError("option group='spatial' needs a frame grid, but this model's tokens have none")


INTERNAL_ERROR = "an error of astraea's own while"  # the warning's words where a pass fails on a graph


def _survives(graph_pass, gm: fx.GraphModule, doing: str) -> bool:
    """Run `graph_pass` (the analysis or the rewrite, `doing` it) on `gm`, a copy of dynamo's graph;
    where it fails, which is a bug of astraea's on this graph, say so and let the caller run the
    graph dense: the user's generation goes on, unchanged, rather than stopping."""
    try:
        graph_pass(gm)
    except Exception as e:  # noqa: BLE001 - any failure leaves the graph as dynamo traced it
        warnings.warn(f"astraea: {INTERNAL_ERROR} {doing} this graph ({error_summary(e)}); it runs dense. Please "
                      "report it, with the model's code", AstraeaWarning, stacklevel=3)
        return False
    return True


def _noting_timestep(forward: Callable, announcements, placeholders: list[fx.Node], position: int | None) -> Callable:
    """`forward`, first noting its call's timestep (its input at `position`, named as a time) for
    the attached model's graphs after it in the same call that take none
    (`Announcements.note_timestep`); as it is where there is nothing to note."""
    if announcements is None or position is None or not named_as_time(placeholders[position]):
        return forward

    def noting(*args):
        announcements.note_timestep(args[position])
        return forward(*args)

    return noting


def compile_graph(gm: fx.GraphModule, example_inputs, config: AstraeaConfig, owner: Backend | None = None):
    from .runtime.announced import announcements_for
    from .runtime.clock import BlockInstances
    from .runtime.runner import PlacedRunner, SparseRunner

    clock = owner.clock if owner is not None else None
    # A pipeline's announcements place the calls of an attached model's graph, with or without a timestep input
    # (a graph dynamo split off after the timestep's embedding has none)
    announcements = announcements_for(example_inputs) if clock is None else None
    dense_gm = gm  # dynamo still reads this graph after we return: rewrite a copy
    gm = copy.deepcopy(gm)
    started = time.perf_counter()
    _log.info("analysing a graph of %d nodes", len(gm.graph.nodes))
    analysis = AnalyseTokens(steps_placed_outside=clock is not None or announcements is not None)
    if not _survives(analysis, gm, "analysing"):
        return dense_gm.forward
    report = analysis.report
    _log.info("%d of %d blocks sparse over %s tokens (%.1f s)", report.num_sparse_blocks, report.num_blocks,
              report.num_tokens, time.perf_counter() - started)
    if owner is not None:
        owner.reports.append(report)
    check_report(config, report, whole_model=clock is None)
    placeholders = [n for n in dense_gm.graph.nodes if n.op == "placeholder"]
    position = next((i for i, n in enumerate(placeholders)
                     if analysis.timestep and n.name == analysis.timestep.name), None)
    if clock is not None and report.num_blocks == 0:
        _log.info("no block in this graph (%s): it runs as traced", report.reason)
        return dense_gm.forward
    if report.num_sparse_blocks == 0:
        why = report.reason or "; ".join(sorted({b.reason for b in report.blocks if b.reason}))
        before = _SPARSE_SHAPES.get(report.structure_hash)
        if before is not None:
            why = f"this model ran sparse at {before} tokens, but at this shape it runs dense: {why}"
        if clock is None and report.num_blocks and report.timestep_input is None:
            why += ("; where dynamo compiles the blocks apart from the model's call, astraea.compile_blocks(model) "
                    "places each block's calls from the model's, and so does a pipeline's announcement for a model "
                    "compiled as torch.compile(astraea.attach(model), ...)")
        warnings.warn(f"astraea: running this graph dense: {why}", AstraeaWarning, stacklevel=2)
        return _noting_timestep(dense_gm.forward, announcements, placeholders, position)
    _SPARSE_SHAPES[report.structure_hash] = report.num_tokens
    for b in report.blocks:
        if not b.sparse:
            warnings.warn(f"astraea: block {b.module or b.index} stays dense: {b.reason}", AstraeaWarning, stacklevel=2)
    sparsify = SparsifyBlocks(analysis)
    if not _survives(sparsify, gm, "rewriting"):
        return _noting_timestep(dense_gm.forward, announcements, placeholders, position)
    for b in sparsify.inputs:
        if b.shared_because and b.shape[0] > 1:
            warnings.warn(f"astraea: block {b.module or b.index} selects one set of tokens for the whole batch of "
                          f"{b.shape[0]}: {b.shared_because}", AstraeaWarning, stacklevel=2)
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    # The skip graph, copying or forecasting, and the sparse graph's forms that keep the forecasts' slopes: each
    # derived and lowered on its first call, from a copy of the rewritten graph taken before lowering changes it.
    rewritten = copy.deepcopy(gm)

    @functools.cache
    def lower_skip(forecasts: bool) -> Callable:
        return lower(reuse_blocks(rewritten, forecasts).graph_module, config, example_inputs, sparsify.inputs, device,
                     SKIP_SLOPE_INPUTS if forecasts else ())

    @functools.cache
    def lower_slopes(forecasts: bool) -> Callable:
        return lower(keep_slopes(rewritten, forecasts).graph_module, config, example_inputs, sparsify.inputs, device,
                     MERGE_SLOPE_INPUTS)

    graph_fn = lower(gm, config, example_inputs, sparsify.inputs, device)
    if clock is not None:  # one runner per instance of the block, all placed by the model's clock
        # the instance's own weight input; none where dynamo specialised the graph to one instance
        weight = next((i for i, n in enumerate(placeholders) if is_module_state(n)), None)
        shapes = tuple(tuple(b.shape) for b in sparsify.inputs)
        runner = BlockInstances(clock, report, config, weight, shapes, lambda branches, config, instance: SparseRunner(
            graph_fn, dense_gm, report, sparsify.inputs, config, device, lower_skip, lower_slopes, cuda_graphs=False,
            branches=branches, stream=instance))
    else:
        runner = PlacedRunner(graph_fn, dense_gm, report, sparsify.inputs, config, device, lower_skip, lower_slopes,
                              timestep_position=position, announcements=announcements)
    if owner is not None:
        owner.runners.append(runner)
    return _noting_timestep(runner, announcements, placeholders, position)
