"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it has to be set here, before
any test module (or the library under test) imports it. Also the `one_thread` fixture of the
modules that measure latency, and each xdist worker's share of the cores.
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


@pytest.fixture(scope="session", autouse=True)
def share_cores_with_workers():
    """Under pytest-xdist, torch's intra-op threads cut to this worker's share of the cores: CI
    runs `-n auto` on two cores, two workers of two threads each, and a large model's forward
    then runs 3-6x slower than alone, not 2x (OpenMP threads spin for a core another process
    holds; the shipped reference model's 20-step generation took 43-65 s instead of 8-15).
    Outside xdist nothing changes. Results do not depend on the thread count (that generation
    is bit-identical at one and two threads)."""
    threads = torch.get_num_threads()
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, threads // workers))
    yield
    torch.set_num_threads(threads)
