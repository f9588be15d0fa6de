"""The GPU suite's pieces must at least import and follow the runner's contract on a CPU machine,
so that the one-shot run on a lent GPU does not die on a typo."""

import importlib
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
GPU_MODULES = sorted(p.stem for p in BENCH.glob("gpu_*.py"))


def test_suite_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_suite.sh")], check=True)


@pytest.mark.parametrize("name", GPU_MODULES)
def test_gpu_benchmark_module_contract(name):
    mod = importlib.import_module(f"bench.{name}")
    assert isinstance(getattr(mod, "TITLE", None), str) and mod.TITLE
    assert callable(getattr(mod, "run", None))
    assert float(getattr(mod, "BUDGET_WEIGHT", 1.0)) > 0


def test_runner_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = subprocess.run([sys.executable, "-m", "bench.run_gpu"], cwd=BENCH.parent, capture_output=True, text=True)
    assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_markdown_table_lists_every_key():
    from bench.run_gpu import markdown_table

    table = markdown_table([{"case": "a", "ms": 1.23456}, {"case": "b", "note": "x"}])
    assert table.splitlines()[0] == "| case | ms | note |"
    assert "1.235" in table
