"""Each sparse call replayed as one CUDA graph: the call's GPU work without its launches.

A sparse call launches a few thousand kernels: per block the scoring, top-k and staleness
update, then the rewritten graph's gathers, fused ops, attention and merge. On a short clip
the GPU runs them faster than Python launches them: on the Wan2.1-1.3B shape at 7,800 tokens
a call at budget 0.1 measured 74 ms against 81 ms for a dense one (benchmarks/NOTES.md).
Captured once per (guidance branch, selection size, selection options), a call is one launch.

What a graph reads must stay where it was captured. The branch's state (caches, scores)
lives as long as the runner, reset in place between generations. The call's inputs are
copied into buffers of the runner's, except the model's own parameters and buffers: an
input at the same address on every call seen so far is taken as one, and a replay that
finds it moved captures again. A key's first call runs uncaptured (Triton compiles and
initialises lazily there), its second captures, and later ones replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

Run = Callable[[tuple], tuple[tuple, int]]  # the call's inputs -> (outputs, tokens per block)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    copied: frozenset[int]  # inputs read from the runner's buffers; the others in place
    pointers: tuple  # where each input was at capture
    outputs: tuple  # in the pool: each replay overwrites them
    tokens: int

    def fits(self, args: tuple) -> bool:
        """Whether every input the graph reads in place is still where it was captured."""
        return all(p is None or i in self.copied or args[i].data_ptr() == p for i, p in enumerate(self.pointers))


class CallGraphs:
    """Runs calls through `run` the first time a key is seen, as a replayed graph after."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: graphs never run at once
        self.graphs: dict[Hashable, _Captured] = {}
        self.seen: set[Hashable] = set()
        self.moving: set[int] = set()  # inputs seen at more than one address: copied in
        self.buffers: dict[int, torch.Tensor] = {}
        self._last: tuple | None = None
        self.captures = 0
        self.replays = 0

    def __call__(self, key: Hashable, run: Run, args: tuple) -> tuple[tuple, int]:
        pointers = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args)
        if self._last is not None:
            self.moving.update(i for i, (p, q) in enumerate(zip(pointers, self._last)) if p != q)
        self._last = pointers
        entry = self.graphs.get(key)
        if entry is not None and entry.fits(args):
            self._copy_in(entry.copied, args)
        elif key not in self.seen:
            self.seen.add(key)
            return run(args)
        else:
            entry = self.graphs[key] = self._capture(run, args, pointers)  # records the work ...
        entry.graph.replay()  # ... and this does it
        self.replays += 1
        # The outputs live in the pool, which the next replay reuses.
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in entry.outputs), entry.tokens

    def _copy_in(self, copied: frozenset[int], args: tuple) -> None:
        for i in copied:
            self.buffers[i].copy_(args[i])

    def _capture(self, run: Run, args: tuple, pointers: tuple) -> _Captured:
        copied = frozenset(i for i in self.moving if isinstance(args[i], torch.Tensor))
        for i in copied:
            buffer = self.buffers.get(i)
            if buffer is None or buffer.shape != args[i].shape or buffer.dtype != args[i].dtype:
                if buffer is not None:
                    self.graphs.clear()  # they read the buffer this one replaces
                self.buffers[i] = torch.empty_like(args[i])
        self._copy_in(copied, args)
        inputs = tuple(self.buffers[i] if i in copied else a for i, a in enumerate(args))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs, tokens = run(inputs)
        self.captures += 1
        return _Captured(graph, copied, pointers, tuple(outputs), tokens)
