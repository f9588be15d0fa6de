"""Packaging: the CMake build's record (skip, failure, architectures), the fatbinary reader and the arch /
driver rules behind the `cuda` backend's refusals, the optional-import helper at every import site, the
extras and the single version, and the contents of a wheel built from the sdist."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import tomllib

import lavin_fast
from lavin_fast import _optional
from lavin_fast.ops import _cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# ----------------------------------------------------------------------------------------------
# CMake: cuda_build.json says what happened; the architecture list.
# ----------------------------------------------------------------------------------------------
def _configure(tmp_path: pathlib.Path, *defs: str, env: dict | None = None) -> dict:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found on PATH")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LAVIN_FAST_")} | (env or {})
    proc = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), *defs], capture_output=True, text=True,
                          env=full_env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "cuda_build.json").read_text())


def test_cmake_skip_by_variable(tmp_path):
    rec = _configure(tmp_path, env={"LAVIN_FAST_SKIP_CUDA_BUILD": "1"})
    assert rec == {"status": "skipped", "detail": "LAVIN_FAST_SKIP_CUDA_BUILD is set", "archs": [], "nvcc_version": ""}


def test_cmake_records_a_failed_build(tmp_path):
    rec = _configure(tmp_path, "-DLAVIN_FAST_CUDA_BUILD_FAILED=ON")
    assert rec["status"] == "skipped" and "failed" in rec["detail"] and "pip install -v" in rec["detail"]


@pytest.mark.parametrize(
    "archs, expected",
    [
        (None, ["80-real", "86-real", "89-real", "90-real", "90-virtual"]),
        ("80,90", ["80-real", "90-real", "90-virtual"]),
        ("sm_86;100", ["86-real", "100-real", "100-virtual"]),
        ("90-real", ["90-real"]),
    ],
)
def test_cmake_arch_list(tmp_path, archs, expected):
    if _cuda_compiler() is None:
        pytest.skip("nvcc not found")
    env = {"LAVIN_FAST_CUDA_ARCHS": archs} if archs else {}
    rec = _configure(tmp_path, f"-DCMAKE_CUDA_COMPILER={_cuda_compiler()}", env=env)
    assert rec["status"] == "built" and rec["archs"] == expected and rec["nvcc_version"].count(".") == 2


def _cuda_compiler() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.isfile(p)), None)


# ----------------------------------------------------------------------------------------------
# What the library holds, and what the backend refuses.
# ----------------------------------------------------------------------------------------------
def _fatbin(entries: list[tuple[int, int, bytes]]) -> bytes:
    """A fatbinary as nvcc lays it out: header, then (kind, arch, payload) entries."""
    body = b""
    for kind, arch, payload in entries:
        header = struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), 0, 0, 8, 1, arch).ljust(64, b"\0")
        body += header + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_fatbin_archs(tmp_path):
    blob = _fatbin([(2, 80, b"x" * 40), (2, 86, b"y" * 8), (1, 90, b"ptx\0"), (2, 90, b"z" * 24)])
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF" + b"\0" * 100 + blob + b"\0" * 32 + _fatbin([(2, 89, b"w")]))
    assert _cuda.fatbin_archs(lib) == {"sass": [80, 86, 89, 90], "ptx": [90]}
    assert _cuda.describe_archs(_cuda.fatbin_archs(lib)) == "sm_80, sm_86, sm_89, sm_90, PTX compute_90"
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"\x7fELF" + b"\0" * 64)
    assert _cuda.fatbin_archs(empty) == {"sass": [], "ptx": []}


def test_arch_coverage_rules():
    default = {"sass": [80, 86, 89, 90], "ptx": [90]}
    for cap in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert _cuda.arch_covered(default, cap), cap
    hopper_only = {"sass": [90], "ptx": []}
    assert not _cuda.arch_covered(hopper_only, (8, 0))  # an A100 with the old sm_90-only build
    assert not _cuda.arch_covered(hopper_only, (10, 0))  # machine code never runs on a newer major
    assert _cuda.arch_covered({"sass": [], "ptx": [80]}, (8, 6))
    assert not _cuda.arch_covered({"sass": [86], "ptx": []}, (8, 0))  # nor on an older minor


def test_driver_rules():
    assert _cuda.driver_check("13.0.88", (13, 0)) is None
    assert _cuda.driver_check("13.0.88", (13, 2), needs_ptx=True) is None
    assert "needs a CUDA 13 driver" in _cuda.driver_check("13.0.88", (12, 8))
    assert "PTX" in _cuda.driver_check("13.2.1", (13, 0), needs_ptx=True)
    assert _cuda.driver_check("13.2.1", (13, 0)) is None  # minor-version compatibility for machine code
    assert _cuda.driver_check(None, (12, 8)) is None and _cuda.driver_check("13.0", None) is None


def test_info_reports_library_and_dali():
    from lavin_fast.cli import info

    lib = info.cuda_library()
    assert set(lib) >= {"loaded", "where", "archs", "build", "driver", "driver_check"}
    if lib["loaded"]:
        assert lib["archs"].startswith("sm_") or "PTX" in lib["archs"]
    dali = info.dali_check()
    assert "check" in dali and (dali["installed"] is None or set(dali["installed"]) <= set(info.DALI_DISTRIBUTIONS))


# ----------------------------------------------------------------------------------------------
# Optional dependencies: one helper, an error naming the extra, used at every import site.
# ----------------------------------------------------------------------------------------------
def test_optional_import_names_the_extra(monkeypatch):
    monkeypatch.setitem(_optional.EXTRAS, "lavin_fast_no_such_module", ("no-such-dist", "data"))
    with pytest.raises(ImportError, match=r"pip install 'lavin-fast\[data\]'.*no-such-dist"):
        _optional.optional_import("lavin_fast_no_such_module")
    with pytest.raises(ImportError, match=r"\[dali-cu13\].*\[dali-cu12\]"):
        monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import of nvidia.dali now fails
        _optional.optional_import("nvidia.dali")
    with pytest.raises(KeyError, match="not a declared optional dependency"):
        _optional.optional_import("json")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_every_extra_module_maps_to_a_declared_extra():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    assert {"dali-cu12", "dali-cu13", "data", "eval", "demo", "bench", "dev", "all"} <= extras, extras
    for module, (_, extra) in _optional.EXTRAS.items():
        assert extra in extras, (module, extra)
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for heavy in ("dali", "opencv", "matplotlib", "scikit-image", "tensorboard"):
        assert heavy not in core, f"{heavy} is in the core requirements"


def _optional_top_levels() -> set[str]:
    return {m.split(".")[0] for m in _optional.EXTRAS} - {"torch"} | {"tensorboard"}


def test_optional_packages_are_imported_through_the_helper():
    """Every `import cv2` / `from nvidia.dali import ...` in the package is the helper's call, or comes after
    `optional_import(...)` of that package earlier in the same block (the guard line)."""
    optional = _optional_top_levels()
    bad = []
    for path in sorted((ROOT / "lavin_fast").rglob("*.py")):
        if path.name == "_optional.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if not isinstance(block, list):
                    continue
                for i, stmt in enumerate(block):
                    names = _imported_modules(stmt)
                    hit = [n for n in names if n.split(".")[0] in optional or n == "torch.utils.tensorboard"]
                    if not hit:
                        continue
                    if isinstance(node, ast.Try) and field == "body":
                        continue  # a probe that reports availability (e.g. dali_available)
                    guarded = {_guard_module(b) for b in block[:i]}
                    if not all(n.split(".")[0] in guarded or n.startswith("torch.") and "tensorboard" in guarded
                               for n in hit):  # fmt: skip
                        bad.append(f"{path.relative_to(ROOT)}:{stmt.lineno} imports {hit} without optional_import")
    assert not bad, "\n".join(bad)


def _imported_modules(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, ast.Import):
        return [a.name for a in stmt.names]
    if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
        return [stmt.module]
    return []


def _guard_module(stmt: ast.stmt) -> str | None:
    """The top-level module of an `optional_import("x.y")` statement (None for any other statement)."""
    call = stmt.value if isinstance(stmt, ast.Expr | ast.Assign) else None
    if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "optional_import" and call.args:
        arg = call.args[0]
        return arg.value.split(".")[0] if isinstance(arg, ast.Constant) else None
    return None


# ----------------------------------------------------------------------------------------------
# Metadata: one version, a license, configs inside the package.
# ----------------------------------------------------------------------------------------------
def test_version_has_one_place():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lavin_fast.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lavin_fast.__version__)
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200] and PYPROJECT["project"]["license"] == "Apache-2.0"


def test_docs_name_no_path_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/reference|the seed's|Table \d of the seed|seed/0|ARCHITECTURE\.md")
    hits = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "lavin_fast").rglob("*"))]:
        if path.is_file() and path.suffix in (".md", ".py", ".yaml"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


# ----------------------------------------------------------------------------------------------
# The wheel: built from the sdist (or the one CI built: $LAVIN_FAST_WHEEL).
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    given = os.environ.get("LAVIN_FAST_WHEEL")
    if given:
        return pathlib.Path(given)
    if not all(_has(m) for m in ("setuptools", "build", "cmake", "ninja")):
        pytest.skip("setuptools, build, cmake and ninja are not installed (pip install -e '.[dev]')")
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:  # PEP 639 license metadata
        pytest.skip(
            f"setuptools {setuptools.__version__} is older than the build needs (>= 77; pip install -e '.[dev]')"
        )
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "LAVIN_FAST_SKIP_CUDA_BUILD"}
    sdist = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)]
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    for cmd in (sdist, wheel):
        if cmd is wheel:
            cmd.append(str(next(out.glob("*.tar.gz"))))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return next(out.glob("*.whl"))


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("tiny-cpu", "0.1B", "1.0B", "3.4B"):
        assert f"lavin_fast/configs/{cfg}.yaml" in names
    for src in ("common.cuh", "sandwich_norm_kernels.cuh", "sandwich_norm.cu", "lavin_fast_cuda.h"):
        assert f"lavin_fast/csrc/{src}" in names  # the CuPy/NVRTC path compiles these
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "csrc/")) for n in names)
    assert "lavin_fast/py.typed" in names and not any(n.endswith(".gitignore") for n in names)
    for data in sorted((ROOT / "lavin_fast" / "perf").glob("*.json")):  # the static baseline ships in the package
        assert f"lavin_fast/perf/{data.name}" in names
    assert "lavin_fast/data/demo_tiny_vae.safetensors" in names  # the demo's bundled tiny VAE (package data)
    with zipfile.ZipFile(wheel) as z:
        record = (
            json.loads(z.read("lavin_fast/lib/cuda_build.json")) if "lavin_fast/lib/cuda_build.json" in names else {}
        )
        if record.get("status") == "built":
            assert "lavin_fast/lib/liblavin_fast_cuda.so" in names
            assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name  # ctypes library: any Python 3
            lib = pathlib.Path(z.extract("lavin_fast/lib/liblavin_fast_cuda.so", wheel.parent / "x"))
            assert _cuda.fatbin_archs(lib)["sass"], "the library holds no machine code"
        elif _cuda_compiler() and not os.environ.get("LAVIN_FAST_WHEEL"):
            pytest.fail(f"nvcc is here but the wheel has no library: {record}")
        else:
            assert "lavin_fast/lib/liblavin_fast_cuda.so" not in names
        cpu = json.loads(z.read("lavin_fast/lib/cpu_build.json")) if "lavin_fast/lib/cpu_build.json" in names else {}
        if cpu.get("status") == "built":  # the CPU kernels (csrc/cpu_fused.cpp): a platform wheel as well
            assert "lavin_fast/lib/liblavin_fast_cpu.so" in names
            assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name
        elif shutil.which("c++") and not os.environ.get("LAVIN_FAST_WHEEL"):
            pytest.fail(f"a C++ compiler is here but the wheel has no CPU library: {cpu}")


# ----------------------------------------------------------------------------------------------
# bench/common.py: GPU timing goes through triton.testing.do_bench (checked here without a GPU).
# ----------------------------------------------------------------------------------------------
def test_cuda_time_ms_delegates_to_do_bench(monkeypatch):
    import torch
    import triton.testing

    from bench import common

    calls, seen = [], {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        fn()
        return 1.5

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    ms = common.cuda_time_ms(lambda: calls.append(1), warmup=4, iters=8)
    assert ms == 1.5 and len(calls) == 3  # compile call, estimate call, do_bench's
    assert seen["return_mode"] == "median" and seen["rep"] == pytest.approx(4 * seen["warmup"])
