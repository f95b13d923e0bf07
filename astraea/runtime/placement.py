"""Which step and branch each call of a model belongs to, from the two sources there are.

A diffusers pipeline announces the step and the branch (`announced.py`); any other caller
is placed from the timestep (`steps.py`). `Placement` picks between them, one source per
generation. A whole-graph runner owns one; when the blocks are compiled on their own, the
model's `StepClock` owns it and every block reads its call's place from there.
"""

from __future__ import annotations

from typing import Callable

from .announced import Announcements
from .steps import Call, StepTracker


class Placement:
    """Places the calls of one model. `check_steps(n)` is told the announced number of steps
    at the start of an announced generation (a schedule too short for it refuses there)."""

    def __init__(self, announcements: Announcements | None, check_steps: Callable[[int], None]):
        self.announcements = announcements
        self.check_steps = check_steps
        self.tracker = StepTracker()
        self._announced = False
        self.last: Call | None = None
        self.moved: Call | None = None  # set by a call that placed the one before it anew

    def reset(self) -> None:
        """The next call starts a new generation."""
        self.tracker.reset()
        self._announced = False
        self.last = self.moved = None

    def place(self, timestep: float | None) -> Call:
        """Place the next call: as the pipeline announces it, else from the timestep.

        A generation uses one source throughout, with one exception: a listener attached
        while the first call compiles hears the pipeline's first announcement with the second
        call. The generation then switches to the announcements there, and the first call is
        placed again from the second's (`moved`): a transformer first called at step 2 (Wan
        2.2's low-noise expert) is at step 2, not 0. Otherwise announced placement starts with
        a generation that begins announced (after the pipeline closed the previous one, or
        when the timestep jumps back up).
        """
        self.moved = None
        self.last = self._place(timestep)
        return self.last

    def _place(self, timestep: float | None) -> Call:
        a = self.announcements
        announced = a.current() if a is not None else None
        switch = announced is not None and not self._announced
        if announced is None or not (self._announced or a.generation_ended()):
            first = self.last
            call = self.tracker.observe(timestep)
            if switch and not call.new_generation and self.tracker.calls == 2:
                return self._join(announced, first, call)
            switch = switch and call.new_generation
            if not switch:
                self._announced = False
                return call
        if switch:
            self._announced = True
            a.reset()
        call = a.observe(announced)
        if call.new_generation:
            self._check_covers(announced)
        return call

    def _check_covers(self, announced) -> None:
        steps = getattr(announced, "num_inference_steps", None)
        if steps:
            self.check_steps(steps)

    def _join(self, announced, first: Call, second: Call) -> Call:
        """Place the second call of the first generation by its announcement, and the first
        (unannounced) call by it: another branch of the same step (the timesteps say which),
        or the same branch one step before."""
        a = self.announcements
        a.reset()
        if second.branch > 0:
            step, name, branches = int(announced.step_index), None, {None: first.branch, announced.name: second.branch}
        else:
            step, name, branches = int(announced.step_index) - 1, announced.name, {announced.name: first.branch}
        a.assume_first_call(step, name, branches)
        self.moved = Call(step=step, branch=first.branch, new_generation=first.new_generation)
        self._announced = True
        self._check_covers(announced)
        return a.observe(announced)
