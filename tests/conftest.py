"""Run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when triton is first imported, so it has to be set here, before
any test module (or the library under test) imports it. Also the `one_thread` fixture of the
modules that measure latency, and the order the test files start in under pytest-xdist.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The slowest files, slowest first (seconds of one file on CI's two cores, 2026-12-04:
# `pytest --durations=0`, summed per file). `--dist loadfile` runs a file on one worker and by
# default starts the files with the most tests first; a slow file with few tests (the support
# table: 3 tests, 107 s) then started last and kept one worker busy a minute after the other
# was done. Started first, the small files fill in around them.
SLOWEST_FILES = (
    "test_support_budget_one.py",  # 120 s
    "test_support_table.py",  # 107 s
    "test_tune.py",  # 84 s
    "test_contract.py",  # 74 s
    "test_reference_latent.py",  # 56 s
    "test_reference.py",  # 53 s
    "test_blockwise.py",  # 51 s
    "test_token_provenance.py",  # 48 s
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection's order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a busy two-core machine: a second intra-op thread mostly waits, and spinning
    threads of concurrent processes make calls ten times slower, which cost tables measure.
    A module that profiles uses it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
