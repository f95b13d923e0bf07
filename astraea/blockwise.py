"""`astraea.compile_blocks(model)`: compile each repeated block on its own, as diffusers'
`compile_repeated_blocks()` does, with astraea as the blocks' backend.

`torch.compile(model, backend="astraea")` has dynamo trace the whole model first (6-10 s for a
30-block Wan, on every start: no cache keeps a trace). Here dynamo traces one block per block
class and reuses that trace for every instance (their weights are graph inputs), so a start
costs what a regional compile costs; the embeddings and the output head run eagerly. Where the
first block's input has other strides than the later blocks' (CogVideoX and HunyuanVideo hand
it a slice), dynamo traces that block class twice, and a block may run through two graphs; the
clock's per-block states serve both. The
analysis, the rewrite and the lowering are those of a whole model, applied to the block's
graph. What a block graph lacks, the step it runs at, comes from a forward pre-hook on the
model that reads the call's timestep (or the pipeline's announcement) before any block runs;
with skip="output" the model's forward is wrapped too, so a skipped call runs nothing.

The blocks are found without code per model: the children of every `ModuleList` or
`Sequential` made of modules of one class that hold modules themselves (a stack of blocks; a
module list that mixes classes is a block's parts). Graphs in which the analysis finds no
block (no attention) run as dynamo traced them.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .backend import Backend
from .config import AstraeaConfig, ConfigError
from .passes.timestep import TIME_NAMES, time_argument
from .runtime.announced import listen
from .runtime.clock import StepClock


def compile_blocks(model: torch.nn.Module, config: AstraeaConfig | None = None, **options) -> Backend:
    """Compile `model`'s repeated blocks with astraea, in place; returns the backend
    (`backend.update(...)`, `backend.set_schedule(...)` change options without recompiling).

    Pass a config or options as keywords, as for `astraea.backend`. The model is called as
    usual afterwards: `model(...)`, or through its pipeline.
    """
    if config is not None and options:
        raise ConfigError("pass either a config or keyword options, not both")
    config = config if config is not None else AstraeaConfig.from_options(options)
    if any(isinstance(getattr(hook, "__self__", None), StepClock) for hook in model._forward_pre_hooks.values()):
        raise ConfigError("astraea.compile_blocks was already applied to this model; to change options use the "
                          "backend it returned (backend.update(...))")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"no blocks found in {type(model).__name__} (a ModuleList or Sequential of modules of one "
                          "class); use torch.compile(model, backend='astraea')")
    read_timestep = timestep_reader(model)
    if read_timestep is None and not hasattr(model, "cache_context"):
        raise ConfigError(f"{type(model).__name__}.forward has no timestep argument (named one of {TIME_NAMES}, or "
                          "containing 'timestep'), so its calls cannot be placed at their steps")
    announcements = listen(model)  # the first change to the model: every refusal comes before it
    backend = Backend(config)
    backend.clock = StepClock(announcements, read_timestep or (lambda args, kwargs: None), lambda: backend.config)
    backend.clock.attach(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
        # a block that gathers rows by `nonzero` (Mochi's valid text) keeps it in its graph, which
        # the analysis reads (passes/compacted_attention.py), rather than breaking the graph there
        block._compiled_call_impl = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)(
            block._compiled_call_impl)
    return backend


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The children of every list of modules of one class that hold modules, outermost lists
    first (a block's own inner lists stay inside it)."""
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        children = list(module.children())
        if len({type(c) for c in children}) == 1 and any(True for _ in children[0].children()):
            found.extend(children)
            inside.update(id(m) for c in children for m in c.modules())
    return found


def timestep_reader(model: torch.nn.Module) -> Callable | None:
    """A function of a forward call's (args, kwargs) giving its timestep as a float (the largest
    value: per-token times run at the noisiest); None if the forward takes no timestep."""
    signature = inspect.signature(model.forward)
    name = time_argument(signature.parameters)
    if name is None:
        return None

    def read(args, kwargs) -> float | None:
        value = signature.bind_partial(*args, **kwargs).arguments.get(name)
        if isinstance(value, torch.Tensor):
            return float(value.max())
        return None if value is None else float(value)

    return read
