"""The denoising context diffusers pipelines announce with `transformer.cache_context(...)`.

Pipelines wrap each transformer call in `with transformer.cache_context("cond", step_index=i,
num_inference_steps=n, ...)`; diffusers hands that context to every stateful hook of the
model. astraea registers one such hook, only to listen: when a pipeline announces the step
and the branch, they are used instead of being inferred from the timestep (and a schedule
shorter than the announced number of steps is refused at the first step).

The hook is registered through diffusers' public `register_hook`, which also wraps the model's
forward; the wrapper is removed again at once (the listener needs no forward), so the forward
dynamo traced stays the one it guards on and nothing recompiles.

A backend is handed a graph and its inputs, never the module, so the listener is attached
explicitly (`astraea.attach(model)`, or by `compile_blocks`, `tune` and the search, which hold the
model): `listen` records the model's parameters, and a graph whose inputs include one of them
hears that model's announcements (`announcements_for`). Without it, steps and branches are
inferred from the timestep.

A call announced by its name alone (HunyuanVideo 1.5's pipeline: `cache_context("pred_cond")`)
is placed by its timestep. Where dynamo split the model's call so that the graph holding the
blocks takes the timestep's embedding and not the timestep, the graph of the same call that
takes it notes it (`note_timestep`) for the graphs after it; the contexts the pipeline sets
around each call tell one call's note from the last one's.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch

from .placement import Announced

HOOK_NAME = "astraea_context_listener"


class Announcements:
    """Reads what the pipeline announced for the current call, and whether it closed a
    generation since the flag was last cleared."""

    def __init__(self, hook):
        self._hook = hook

    def current(self) -> Announced | None:
        """The announced step, branch name and step count of the current call, or None."""
        context = self._hook.manager.announced
        if context is None or context.step_index is None:
            return None
        return Announced(int(context.step_index), context.name, getattr(context, "num_inference_steps", None))

    @property
    def ended(self) -> bool:
        """Whether the pipeline closed a generation (reset its hooks) since this was cleared."""
        return self._hook.ended

    @ended.setter
    def ended(self, value: bool) -> None:
        self._hook.ended = value

    def note_timestep(self, timestep: torch.Tensor) -> None:
        """Keep the timestep of the announced call now running, as a graph that takes it sees it,
        for a later graph of the same call that does not (no host read here)."""
        manager = self._hook.manager
        if manager.announced is not None:
            self._hook.noted = (manager.serial, timestep)

    def noted_timestep(self) -> torch.Tensor | None:
        """The timestep noted during the announced call now running, or None (no call announced,
        or no graph of this call took the timestep before)."""
        manager, noted = self._hook.manager, self._hook.noted
        if manager.announced is None or noted is None or noted[0] != manager.serial:
            return None
        return noted[1]


_ATTACHED: dict[int, tuple[weakref.ref, Announcements]] = {}  # id of a parameter -> (the parameter, its model's)


def announcements_for(tensors: Iterable) -> Announcements | None:
    """The announcements of the attached model one of `tensors` (a graph's inputs) belongs to."""
    for tensor in tensors:
        entry = _ATTACHED.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
    return None


def listen(module: torch.nn.Module) -> Announcements | None:
    """Attach (once) a listening hook to a diffusers model, and record its parameters for
    `announcements_for`; None for any other module."""
    if not hasattr(module, "cache_context"):
        return None
    try:
        from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
    except ImportError:
        return None

    class Heard(StateManager):
        """diffusers hands every stateful hook's state manager the context a pipeline
        announces, through its public `set_context`; this one keeps it where we read it."""

        announced = None
        serial = 0  # contexts set so far: a timestep noted under one is known to be the current call's

        def set_context(self, context) -> None:
            super().set_context(context)
            self.announced = context
            self.serial += 1

    class Listener(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.manager = Heard(BaseState)
            self.ended = False
            self.noted = None  # (the context's serial, the timestep tensor) noted by a graph of that call

        def reset_state(self, module):  # pipelines call this after every generation
            self.manager.reset()
            self.manager.announced = None
            self.ended = True
            self.noted = None
            return module

    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(HOOK_NAME)
    if hook is None:
        hook = Listener()
        had, previous = "forward" in vars(module), vars(module).get("forward")
        registry.register_hook(hook, HOOK_NAME)
        if had:
            module.forward = previous
        else:
            del module.forward
    announcements = Announcements(hook)
    for dead in [key for key, (ref, _) in _ATTACHED.items() if ref() is None]:
        del _ATTACHED[dead]
    for tensor in (*module.parameters(), *module.buffers()):
        _ATTACHED[id(tensor)] = (weakref.ref(tensor), announcements)
    return announcements
