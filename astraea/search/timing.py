"""Wall time on the device the work runs on.

On a GPU, CUDA events bracket each transformer call, so timing a call neither waits for the
GPU nor lets host overhead of the next call hide in it; the events are read once, at the end.
On a CPU the work is synchronous and `perf_counter` is exact enough.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Stands in for a transformer and records how long each call took.

    Attribute access (`cache_context`, `config`, `dtype`, ...) reaches the wrapped
    transformer, so a sampler uses the timer exactly as it would use the transformer.
    """

    def __init__(self, transformer: Callable, device: torch.device):
        self.transformer = transformer
        self.device = torch.device(device)
        self._marks: list = []

    def __call__(self, *args, **kwargs):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.transformer(*args, **kwargs)
            end.record()
            self._marks.append((start, end))
        else:
            start = time.perf_counter()
            out = self.transformer(*args, **kwargs)
            self._marks.append(time.perf_counter() - start)
        return out

    def __getattr__(self, name):
        return getattr(self.transformer, name)

    def take(self) -> list[float]:
        """Milliseconds of every call since the last `take`, in call order."""
        _synchronize(self.device)
        if self.device.type == "cuda":
            times = [start.elapsed_time(end) for start, end in self._marks]
        else:
            times = [seconds * 1e3 for seconds in self._marks]
        self._marks = []
        return times


def wall_ms(run: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median milliseconds of `run()` from start to the device being done."""
    device = torch.device(device)
    times = []
    for i in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
