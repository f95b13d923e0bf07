"""How a launcher starts its Triton kernel: directly when it runs, through `wrap_triton`
when Inductor traces the `triton_op` that wraps it (its tensors are then fake).

Run eagerly, `wrap_triton(kernel)[grid](...)` dispatches a higher-order op and files the
launch's constants in a side table on every call: 0.7-1 ms of host time per launch on the
GPU machine (torch.profiler, benchmarks/NOTES.md), 30 attention and 30 merge launches per
forward of a 30-block model. A direct launch costs tens of microseconds.
"""

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton


def launchable(kernel, example: torch.Tensor):
    return wrap_triton(kernel) if is_fake(example) else kernel
