"""Which step and guidance branch each call of a model belongs to: a pure function of what
the calls so far showed.

A call shows its timestep, the pipeline's announcement if there is one (diffusers pipelines
wrap each transformer call in `cache_context(name, step_index=i, num_inference_steps=n)`,
heard through `announced.py`), and whether the pipeline closed a generation since then.
`place(state, seen)` returns the new state and the call's place; it reads and writes nothing
else, so a table of calls and places tests it (`tests/test_placement.py`). `Placement` holds
the state for a runner, or for the model's clock when blocks are compiled on their own.

From the timestep: calls that share a timestep are one step, the j-th of them is branch j
(pipelines call the conditional branch first), a timestep higher than the step's starts a new
generation, and without a timestep every call is a step. From announcements: the announced
step, branches numbered by name in order of appearance, and a step lower than the last (or a
name seen twice in one step) starts a new generation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..schedule import Schedule
from .steps import Call


@dataclass(frozen=True)
class Announced:
    """A pipeline's announcement of a call."""

    step: int
    name: str
    num_steps: int | None = None


@dataclass(frozen=True)
class Seen:
    """What a call shows: its timestep (None: the model takes none), its announcement, and
    whether the pipeline closed a generation (reset its hooks) since that was last read."""

    timestep: float | None
    announced: Announced | None = None
    ended: bool = False


@dataclass(frozen=True)
class State:
    # from the timestep
    timestep: float | None = None  # the current step's (-inf: the model takes none)
    step: int = -1
    in_step: int = 0  # calls in the current step so far, less one
    calls: int = 0  # calls placed by timestep since the last reset
    # from announcements
    announced: bool = False  # this generation is placed by its announcements
    announced_step: int | None = None
    names_this_step: frozenset = frozenset()
    branches: tuple = ()  # (name, branch) pairs; the name None: a first call's, not yet heard
    last: Call | None = None


@dataclass(frozen=True)
class Placed:
    state: State
    call: Call
    moved: Call | None = None  # the call before, placed anew (a late listener's first call)
    read_ended: bool = False  # the `ended` flag was read: the caller clears it
    num_steps: int | None = None  # an announced generation began with this many steps


def place(state: State, seen: Seen) -> Placed:
    """Place one call. A generation uses one source throughout, with one exception: a listener
    attached while the first call compiled hears the first announcement with the second call.
    The generation then switches to the announcements there, and the first call is placed
    again from the second's (`moved`): a transformer first called at step 2 (Wan 2.2's
    low-noise expert) is at step 2, not 0. Otherwise announced placement starts with a
    generation that begins announced (after the pipeline closed the previous one, or when the
    timestep jumps back up)."""
    a = seen.announced
    switch = a is not None and not state.announced
    read_ended = switch  # the flag is read only here, as the condition below reads it
    if a is None or not (state.announced or seen.ended):
        first = state.last
        tracked, call = _track(state, seen.timestep)
        if switch and not call.new_generation and tracked.calls == 2:
            return _join(tracked, a, first, call, read_ended)
        if not (switch and call.new_generation):
            tracked = replace(tracked, announced=False, last=call)
            return Placed(tracked, call, read_ended=read_ended)
        state = tracked
    if switch:
        state = replace(state, announced=True, announced_step=None, names_this_step=frozenset(), branches=())
    state, call = _observe(state, a)
    return Placed(replace(state, last=call), call, read_ended=read_ended,
                  num_steps=a.num_steps if call.new_generation else None)


def _track(state: State, timestep: float | None) -> tuple[State, Call]:
    """Place a call by its timestep."""
    new = state.timestep is None or (timestep is not None and timestep > state.timestep)
    if new:
        step, in_step = 0, 0
    elif timestep is not None and timestep == state.timestep:
        step, in_step = state.step, state.in_step + 1
    else:
        step, in_step = state.step + 1, 0
    state = replace(state, timestep=timestep if timestep is not None else float("-inf"), step=step, in_step=in_step,
                    calls=state.calls + 1)
    return state, Call(step=step, branch=in_step, new_generation=new)


def _observe(state: State, a: Announced) -> tuple[State, Call]:
    """Place a call by its announcement."""
    new = state.announced_step is None or a.step < state.announced_step or (
        a.step == state.announced_step and a.name in state.names_this_step)
    branches = {} if new else dict(state.branches)
    names = frozenset() if new or a.step != state.announced_step else state.names_this_step
    if a.name not in branches and None in branches:
        branches[a.name] = branches.pop(None)  # the unannounced first call's name
    branch = branches.setdefault(a.name, len(branches))
    state = replace(state, announced_step=a.step, names_this_step=names | {a.name}, branches=tuple(branches.items()))
    return state, Call(step=a.step, branch=branch, new_generation=new)


def _join(state: State, a: Announced, first: Call, second: Call, read_ended: bool) -> Placed:
    """Place the second call of the first generation by its announcement, and the first
    (unannounced) call by it: another branch of the same step (the timesteps say which), or
    the same branch one step before."""
    if second.branch > 0:
        step, name, branches = a.step, None, {None: first.branch, a.name: second.branch}
    else:
        step, name, branches = a.step - 1, a.name, {a.name: first.branch}
    state = replace(state, announced=True, announced_step=step, names_this_step=frozenset({name}),
                    branches=tuple(branches.items()))
    moved = Call(step=step, branch=first.branch, new_generation=first.new_generation)
    state, call = _observe(state, a)
    return Placed(replace(state, last=call), call, moved, read_ended, a.num_steps)


class Placement:
    """The placement state of one model's calls, fed by what each call shows.

    `announcements` (or None) hears the pipeline; `schedule()` is the schedule in force: it is
    told the announced number of steps when an announced generation begins (a schedule too
    short refuses there), and a schedule on the time axis gets each step's time with its calls.
    """

    def __init__(self, announcements, schedule: Callable[[], Schedule]):
        self.announcements = announcements
        self.schedule = schedule
        self.state = State()
        self.moved: Call | None = None  # set by a call that placed the one before it anew
        self._time: tuple[int, float | None] | None = None  # (step, its time) of the current step

    def reset(self) -> None:
        """The next call starts a new generation."""
        self.state, self.moved, self._time = State(), None, None

    def place(self, read_timestep: Callable[[], float | None]) -> Call:
        """Place the next call. The timestep is read (a host sync for a tensor on the GPU) only
        where the announcements do not place it alone, and once a step for a schedule on the
        time axis."""
        a = self.announcements
        announced = a.current() if a is not None else None
        timestep = None if announced is not None and self.state.announced else read_timestep()
        seen = Seen(timestep, announced, a is not None and a.ended)
        placed = place(self.state, seen)
        if placed.read_ended and a is not None:
            a.ended = False
        self.state, self.moved, call = placed.state, placed.moved, placed.call
        schedule = self.schedule()
        if placed.num_steps:
            schedule.check_steps(placed.num_steps)
        if schedule.on_time_axis:
            if call.new_generation or self._time is None or self._time[0] != call.step:
                self._time = (call.step, timestep if timestep is not None else read_timestep())
            call = replace(call, time=self._time[1])
        return call
