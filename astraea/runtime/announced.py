"""The denoising context diffusers pipelines announce with `transformer.cache_context(...)`.

Pipelines wrap each transformer call in `with transformer.cache_context("cond", step_index=i,
num_inference_steps=n, ...)`; diffusers hands that context to every stateful hook of the
model. astraea registers one such hook, only to listen: when a pipeline announces the step
and the branch, they are used instead of being inferred from the timestep (and a schedule
shorter than the announced number of steps is refused at the first step).

The hook is registered through diffusers' public `register_hook`, which also wraps the model's
forward; the wrapper is removed again at once (the listener needs no forward), so the forward
dynamo traced stays the one it guards on and nothing recompiles.
"""

from __future__ import annotations

import sys

import torch

from .steps import Call

HOOK_NAME = "astraea_context_listener"


class Announcements:
    """Reads the current context, and places calls by announced step and branch name."""

    def __init__(self, hook):
        self._hook = hook
        self.reset()

    def reset(self) -> None:
        self._step: int | None = None
        self._names_this_step: set[str] = set()
        self._branches: dict[str, int] = {}

    def current(self):
        """The announced CacheContext (name, step_index, num_inference_steps...) or None."""
        context = getattr(self._hook.manager, "_context", None)
        return context if context is not None and context.step_index is not None else None

    def assume_first_call(self, step: int, name: str | None, branches: dict) -> None:
        """Take an unannounced first call as announced at `step` under `name`, with the branch
        numbers known so far by name; the name None stands for a first call's name not yet
        known (the next name not seen before gets its branch)."""
        self._step, self._names_this_step = step, {name}
        self._branches = dict(branches)

    def generation_ended(self) -> bool:
        """Whether the pipeline closed a generation (reset its hooks) since the last look."""
        ended, self._hook.ended = self._hook.ended, False
        return ended

    def observe(self, context) -> Call:
        step, name = int(context.step_index), context.name
        new = self._step is None or step < self._step or (step == self._step and name in self._names_this_step)
        if new:
            self._branches.clear()
        if new or step != self._step:
            self._names_this_step = set()
        self._step = step
        self._names_this_step.add(name)
        if name not in self._branches and None in self._branches:
            self._branches[name] = self._branches.pop(None)  # the unannounced first call's name
        branch = self._branches.setdefault(name, len(self._branches))
        return Call(step=step, branch=branch, new_generation=new)


def compiled_module() -> torch.nn.Module | None:
    """The module whose forward dynamo is compiling, found on the calling frames."""
    frame = sys._getframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "_call_impl" and isinstance(owner, torch.nn.Module):
            if not isinstance(owner, torch._dynamo.eval_frame.OptimizedModule):
                return owner
        frame = frame.f_back
    return None


def listen(module: torch.nn.Module | None) -> Announcements | None:
    """Attach (once) a listening hook to a diffusers model; None for any other module."""
    if module is None or not hasattr(module, "cache_context"):
        return None
    try:
        from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
    except ImportError:
        return None

    class Listener(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.manager = StateManager(BaseState)
            self.ended = False

        def reset_state(self, module):  # pipelines call this after every generation
            self.manager.reset()
            self.ended = True
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
    return Announcements(hook)
