"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it has to be set here, before
any test module (or the library under test) imports it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
