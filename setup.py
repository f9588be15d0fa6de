"""setuptools entry point: pyproject.toml holds the metadata; this file adds the CUDA C++ build.

When nvcc and cmake are found, `pip install .` (and `pip install -e .`) builds csrc/ with CMake into
liblavin_fast_cuda.so and puts it in lavin_fast/lib/. The build never fails the install: without
CUDA, or when the build fails, it prints why and the package works without the library (Triton /
CuPy / torch paths). The csrc/ sources are also packaged (lavin_fast/csrc/) for CuPy's NVRTC path.

Environment:
  LAVIN_FAST_SKIP_CUDA_BUILD=1   skip the build
  LAVIN_FAST_CUDA_ARCHS="90"     CUDA architectures (semicolon or comma list), default 90
  CUDA_HOME / CUDACXX            where nvcc is, if not on PATH
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = pathlib.Path(__file__).resolve().parent
LIB_NAME = "liblavin_fast_cuda.so"
CSRC_FILES = ("common.cuh", "sandwich_norm_kernels.cuh", "sandwich_norm.cu", "lavin_fast_cuda.h")


def _log(msg: str) -> None:
    print(f"lavin-fast CUDA build: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    for cand in (
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
        "/usr/local/cuda/bin/nvcc",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_cuda_library(out_dir: pathlib.Path) -> tuple[bool, str]:
    """Build liblavin_fast_cuda.so into out_dir. Returns (built?, what happened); never raises."""
    if os.environ.get("LAVIN_FAST_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "skipped (LAVIN_FAST_SKIP_CUDA_BUILD is set)"
    nvcc = find_nvcc()
    if nvcc is None:
        return False, "skipped: nvcc not found (set CUDA_HOME or CUDACXX to build the CUDA C++ kernels)"
    cmake = shutil.which("cmake")
    if cmake is None:
        return False, "skipped: cmake not found on PATH"
    archs = os.environ.get("LAVIN_FAST_CUDA_ARCHS", "90") or "90"
    try:
        with tempfile.TemporaryDirectory(prefix="lavin_fast_cuda_") as build:
            configure = [cmake, "-S", str(ROOT), "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                         f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs.replace(',', ';')}"]  # fmt: skip
            for cmd in (configure, [cmake, "--build", build, "-j", str(min(os.cpu_count() or 1, 8))]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
                    return False, f"failed (`{' '.join(cmd[:2])} ...` exit {proc.returncode}):\n{tail}"
            lib = pathlib.Path(build) / LIB_NAME
            if not lib.is_file():
                return False, f"failed: CMake finished but {LIB_NAME} is missing"
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, out_dir / LIB_NAME)
    except Exception as exc:  # never fail the install for the optional library
        return False, f"failed: {type(exc).__name__}: {exc}"
    return True, f"built {out_dir / LIB_NAME} for sm_{archs} with {nvcc}"


class BuildPyWithCuda(build_py):
    """build_py, then the CUDA library and the csrc/ sources into the package (or, for editable
    installs, into the source tree's lavin_fast/)."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        pkg = ROOT / "lavin_fast" if editable else pathlib.Path(self.build_lib) / "lavin_fast"
        lib_dir = pkg / "lib"
        ok, what = build_cuda_library(lib_dir)
        _log(what)
        lib_dir.mkdir(parents=True, exist_ok=True)
        (lib_dir / "cuda_build.txt").write_text(what.splitlines()[0] + "\n")
        if not editable:  # editable installs read csrc/ from the source tree
            (pkg / "csrc").mkdir(parents=True, exist_ok=True)
            for name in CSRC_FILES:
                shutil.copy2(ROOT / "csrc" / name, pkg / "csrc" / name)


class BinaryDistribution(Distribution):
    """Wheels carry a compiled library: tag them for the platform."""

    def has_ext_modules(self) -> bool:
        return True


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithCuda}, distclass=BinaryDistribution)
