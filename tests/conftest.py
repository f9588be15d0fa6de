"""Test configuration. Without a GPU, Triton kernels run in the interpreter: the variable must be
set before any kernel is defined, hence here, before lavin_fast's op modules are imported.
The GPU suite sets LAVIN_FAST_GPU_TESTS=1 to compile the kernels for the device instead."""

import os

if os.environ.get("LAVIN_FAST_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _cuda_ready() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_suite.sh on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: a folder named gpu matches that
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """LAVIN_FAST_TEST_TIMEOUT=<seconds> (set by bench/gpu_suite.sh): a test running past it fails with a
    TimeoutError and the run goes on (a hung test must not take the suite's summary with it)."""
    from lavin_fast.testing import time_limit

    seconds = float(os.environ.get("LAVIN_FAST_TEST_TIMEOUT") or 0)
    with time_limit(seconds, lambda: TimeoutError(f"{item.nodeid} ran past LAVIN_FAST_TEST_TIMEOUT={seconds:g} s")):
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
