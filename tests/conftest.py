"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it has to be set here, before
any test module (or the library under test) imports it. Also the `one_thread` fixture of the
modules that measure latency.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a busy two-core machine: a second intra-op thread mostly waits, and spinning
    threads of concurrent processes make calls ten times slower, which cost tables measure.
    A module that profiles uses it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
