"""How a launcher starts its Triton kernel: directly when it runs, through `wrap_triton`
when Inductor traces the `triton_op` that wraps it (its tensors are then fake).

Run eagerly, `wrap_triton(kernel)[grid](...)` dispatches a higher-order op and files the
launch's constants in a side table on every call, which a direct launch skips. On the GPU
machine the attention and merge ops took 0.95 and 0.58 ms of host time per call with it
(torch.profiler, benchmarks/NOTES.md), 30 of each per forward of a 30-block model; how much of
that was the wrapper was not measured apart, nor the time saved.
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton


def launchable(kernel, example: torch.Tensor):
    return wrap_triton(kernel) if is_fake(example) else kernel
