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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
