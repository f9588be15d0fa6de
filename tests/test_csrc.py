"""csrc/: CMake + nvcc build for sm_90 (no GPU needed), ptxas resource report (no spills), exported C ABI,
the ctypes loader's status without a GPU and the Python mirror of the launch configuration (the build's
packaging, skip and failure paths: tests/test_packaging.py)."""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from lavin_fast.ops import _cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORTS = {
    "lavin_fast_cuda_abi_version",
    "lavin_fast_cuda_error_string",
    "lavin_sandwich_norm_max_d",
    "lavin_sandwich_norm_config",
    "lavin_rms_norm_modulate_fwd",
    "lavin_rms_norm_modulate_bwd",
    "lavin_gated_rms_norm_residual_fwd",
    "lavin_gated_rms_norm_residual_bwd",
}
N_KERNELS = 24  # {fwd, bwd} x {modulate, gated} x {f32, f16, bf16} x {16-byte vectors, scalar}


def _header_items() -> tuple[int, int]:
    """(kItemsFwd, kItemsBwd) of csrc/sandwich_norm_kernels.cuh: 16-byte vector slots per thread."""
    text = (ROOT / "csrc" / "sandwich_norm_kernels.cuh").read_text()
    return tuple(int(re.search(rf"constexpr int kItems{k} = (\d+);", text).group(1)) for k in ("Fwd", "Bwd"))


ITEMS_FWD, ITEMS_BWD = _header_items()


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            return cand
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Build csrc/ once for sm_90 with verbose ptxas; returns the library path and the build log."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA C++ build needs the CUDA toolkit (CI has it)")
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found on PATH")
    build = tmp_path_factory.mktemp("csrc_build")
    cfg = ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CUDA_COMPILER={nvcc}",
           "-DCMAKE_CUDA_ARCHITECTURES=90", "-DLAVIN_FAST_PTXAS_VERBOSE=ON"]  # fmt: skip
    log = ""
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log += proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-4000:]}"
    lib = build / _cuda.LIB_NAME
    assert lib.is_file(), f"{lib} not built:\n{log[-2000:]}"
    return {"lib": lib, "log": log}


@pytest.fixture
def loaded(built, monkeypatch):
    """_cuda pointed at the freshly built library (caches cleared before and after)."""
    monkeypatch.setenv("LAVIN_FAST_CUDA_LIB", str(built["lib"]))
    _cuda.load_library.cache_clear()
    lib, where = _cuda.load_library()
    assert lib is not None, where
    yield lib
    _cuda.load_library.cache_clear()


def test_ptxas_reports_no_spills(built):
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", built["log"])
    spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", built["log"])
    assert len(set(entries)) == N_KERNELS, f"expected {N_KERNELS} kernels, ptxas compiled {sorted(set(entries))}"
    assert len(spills) >= N_KERNELS
    bad = [(e, s) for e, s in zip(entries, spills, strict=False) if any(int(v) for v in s)]
    assert not bad, f"kernels with stack or spills (frame, stores, loads): {bad}"
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", built["log"])]
    assert regs and max(regs) <= 128  # __launch_bounds__(512): 128 registers at most


def test_cuobjdump_resource_usage(built):
    tool = shutil.which("cuobjdump") or os.path.join(os.path.dirname(os.path.realpath(_nvcc())), "cuobjdump")
    if not os.path.isfile(tool):
        from lavin_fast.perf.aot import _nvidia_bin  # the cuobjdump shipped inside Triton's package

        try:
            tool = _nvidia_bin("cuobjdump")
        except (FileNotFoundError, ImportError):
            pytest.skip("cuobjdump not found")
    out = subprocess.run([tool, "--dump-resource-usage", str(built["lib"])], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    usage = re.findall(r"Function (\w+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out.stdout)
    assert len(usage) == N_KERNELS, out.stdout[-2000:]
    assert all(int(local) == 0 and int(stack) == 0 for _, _, stack, _, local in usage), usage
    assert "sm_90" in out.stdout


def test_exported_symbols(built):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(built["lib"])], capture_output=True, text=True, check=True)
    symbols = {line.split()[-1] for line in out.stdout.splitlines() if " T " in line}
    assert EXPORTS <= symbols, f"missing exports: {EXPORTS - symbols}"
    assert not {s for s in symbols if s.startswith("lavin")} - EXPORTS, "unexpected lavin_* exports"
    assert not [s for s in symbols if s.startswith("_ZN5lavin")], "C++ kernel symbols leak out of the library"


def test_library_abi_without_gpu(loaded):
    lib = loaded
    assert lib.lavin_fast_cuda_abi_version() == _cuda.ABI_VERSION
    for dtype, code in _cuda.DTYPE_CODES.items():
        for vectorized in (True, False):
            vec = 16 // dtype.itemsize if vectorized else 1
            assert lib.lavin_sandwich_norm_max_d(code, int(vectorized)) == _cuda.MAX_BLOCK_THREADS * ITEMS_BWD * vec
            assert _cuda.max_d(dtype, vectorized) <= _cuda.MAX_BLOCK_THREADS * ITEMS_BWD * vec  # never accepts more
    assert lib.lavin_sandwich_norm_max_d(9, 1) == 0
    # Bad arguments are refused before any CUDA call (there is no GPU here).
    args = (0, 0, 0, 1, 1, 8, 8, 8, 8, 1e-6, None)
    assert lib.lavin_rms_norm_modulate_fwd(7, *args) == -1
    assert lib.lavin_rms_norm_modulate_fwd(0, 0, 0, 0, 1, 1, 0, 8, 8, 8, 1e-6, None) == -2
    too_wide = lib.lavin_sandwich_norm_max_d(0, 0) + 1  # float32, unaligned
    for fn in (lib.lavin_rms_norm_modulate_fwd, lib.lavin_gated_rms_norm_residual_fwd):  # forward and backward share it
        n_ptrs = 3 if fn is lib.lavin_rms_norm_modulate_fwd else 4
        n_strides = 3 if n_ptrs == 3 else 5
        assert fn(0, *(0,) * n_ptrs, 1, 1, too_wide, *(too_wide,) * n_strides, 1e-6, None) == -3
    assert lib.lavin_rms_norm_modulate_bwd(0, *(0,) * 5, 1, 1, too_wide, *(too_wide,) * 5, 1e-6, 4, None) == -3
    assert lib.lavin_gated_rms_norm_residual_bwd(2, *(0,) * 5, 1, 4, 16, *(16,) * 5, 1e-6, 0, None) == -2
    # Empty work launches nothing and succeeds.
    assert lib.lavin_rms_norm_modulate_fwd(2, 0, 0, 0, 0, 5, 64, 64, 64, 64, 1e-6, None) == 0
    assert b"D exceeds" in lib.lavin_fast_cuda_error_string(-3)


@pytest.mark.parametrize("backward", [False, True])
def test_launch_config_mirror(loaded, backward):
    """_cuda._config (CuPy path) computes the same launch shape as make_config in sandwich_norm.cu."""
    tpr, rpb = ctypes.c_int(), ctypes.c_int()
    fn = loaded.lavin_sandwich_norm_config
    fn.argtypes = [
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_int),
    ]
    items = ITEMS_BWD if backward else ITEMS_FWD
    for vec in (1, 4, 8):
        for D in [vec * k for k in (1, 2, 3, 5, 16, 37, 64, 100, 128, 129, 288, 512, 1000, 1024)] + [512, 1024, 2304]:
            if D % vec:
                continue
            code = fn(D, vec, int(backward), ctypes.byref(tpr), ctypes.byref(rpb))
            if -(-(D // vec) // items) > _cuda.MAX_BLOCK_THREADS:
                assert code == -3
                with pytest.raises(ValueError):
                    _cuda._config(D, vec, items)
                continue
            assert code == 0
            assert (tpr.value, rpb.value) == _cuda._config(D, vec, items), (D, vec)
            assert tpr.value * items * vec >= D  # the row fits: one pass
            assert tpr.value * rpb.value <= _cuda.MAX_BLOCK_THREADS


def test_python_mirror_items_match_csrc():
    assert (_cuda.ITEMS_FWD, _cuda.ITEMS_BWD) == (ITEMS_FWD, ITEMS_BWD)


def test_status_reports_library_and_device(loaded, built):
    usable, detail = _cuda.status()
    assert str(built["lib"]) in detail and "compiled library" in detail
    if torch.cuda.is_available():
        assert usable
    else:
        assert not usable and "no CUDA device" in detail


def test_status_without_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LAVIN_FAST_CUDA_LIB", str(tmp_path / "missing.so"))
    monkeypatch.setattr(_cuda, "_lib_dirs", lambda: [tmp_path])  # no lavin_fast/lib either
    _cuda.load_library.cache_clear()
    try:
        usable, detail = _cuda.status()
    finally:
        _cuda.load_library.cache_clear()
    assert isinstance(detail, str) and "missing.so absent" in detail
    if _cuda.cupy_import_error() is not None:
        assert not usable and "CuPy is not importable" in detail


def test_vector_width_rule():
    """16-byte vectors only when D, every row stride and every pointer allow it (as pick_vec in C)."""
    x = torch.zeros(2, 3, 2304, dtype=torch.bfloat16)
    assert _cuda.vector_width(torch.bfloat16, 2304, [x]) == 8
    assert _cuda.vector_width(torch.float32, 2304, [x.float()]) == 4
    wide = torch.zeros(2, 3, 2305, dtype=torch.bfloat16)
    assert _cuda.vector_width(torch.bfloat16, 2304, [wide[..., 1:]]) == 1  # pointer and row stride misaligned
    assert _cuda.vector_width(torch.bfloat16, 37, [torch.zeros(1, 2, 37, dtype=torch.bfloat16)]) == 1
    assert _cuda.max_d(torch.bfloat16, True) >= 2304 and _cuda.max_d(torch.float32, False) >= 512


def test_cuda_backend_refuses_cpu_tensors():
    reasons = _cuda.refusals(torch.zeros(1, 2, 8), torch.zeros(1, 8))
    assert reasons and "CUDA tensors" in reasons[0]


# ----------------------------------------------------------------------------------------------
# The CuPy path: the same sources through NVRTC (what cupy.RawModule runs), no GPU needed.
# ----------------------------------------------------------------------------------------------
def _load_nvrtc() -> ctypes.CDLL | None:
    import ctypes.util
    import glob
    import site
    import sys

    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64")]
    for sp in [*site.getsitepackages(), *glob.glob(f"{sys.base_prefix}/lib/python3*/site-packages")]:
        dirs += glob.glob(os.path.join(sp, "nvidia", "cu1*", "lib")) + glob.glob(
            os.path.join(sp, "nvidia", "cuda_nvrtc", "lib")
        )
    dirs += glob.glob("/root/.pyenv/versions/*/lib/python3*/site-packages/nvidia/cu1*/lib")
    for d in dirs:
        libs = sorted(glob.glob(os.path.join(d, "libnvrtc.so*")))
        if not libs:
            continue
        for builtins in glob.glob(os.path.join(d, "libnvrtc-builtins.so*")):  # NVRTC dlopens it by name
            if ".alt." not in builtins:
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(libs[0])
    found = ctypes.util.find_library("nvrtc")
    return ctypes.CDLL(found) if found else None


def test_nvrtc_compiles_the_same_sources():
    """The CuPy path's source (csrc headers inlined) compiles with NVRTC for sm_90: every kernel name
    resolves and ptxas reports no spills."""
    try:
        nv = _load_nvrtc()
    except OSError as exc:
        pytest.skip(f"libnvrtc does not load: {exc}")
    if nv is None:
        pytest.skip("libnvrtc not found (CUDA toolkit or nvidia-cuda-nvrtc wheel)")
    prog = ctypes.c_void_p()
    assert (
        nv.nvrtcCreateProgram(ctypes.byref(prog), _cuda.nvrtc_source().encode(), b"sandwich_norm.cu", 0, None, None)
        == 0
    )
    try:
        names = _cuda.kernel_names()
        assert len(names) == N_KERNELS
        for n in names:
            assert nv.nvrtcAddNameExpression(prog, n.encode()) == 0
        opts = [o.encode() for o in (*_cuda.NVRTC_OPTIONS, "-arch=sm_90", "-Xptxas=-v")]
        rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nv.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        assert rc == 0, f"NVRTC failed ({rc}):\n{text[-3000:]}"
        lowered = ctypes.c_char_p()
        for n in names:
            assert nv.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(lowered)) == 0 and lowered.value
        spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert len(spills) == N_KERNELS, text[-2000:]
        assert all(v == ("0", "0", "0") for v in spills), spills
    finally:
        nv.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["modulate", "gated"])
@pytest.mark.parametrize("shape", [(2, 100, 2304), (1, 33, 40)], ids=["2304", "40"])
def test_gpu_built_library_matches_reference(loaded, kind, shape):
    """The library built above (ctypes path, even where CuPy is installed) against the float64 reference in bf16."""
    from test_sandwich_norm import _check  # tests/ is on sys.path (rootless test modules)

    assert _cuda.path()[0] == "library"
    _check(kind, shape, torch.bfloat16, "cuda", "cuda")
