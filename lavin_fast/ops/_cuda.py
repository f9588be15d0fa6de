"""The CUDA C++ kernels of csrc/: loading, status, and launch wrappers taking torch tensors.

Two ways to the same kernels, tried in this order at first use (never at import):
1. the compiled library liblavin_fast_cuda.so (built by CMake with nvcc during `pip install`), loaded
   with ctypes from $LAVIN_FAST_CUDA_LIB or lavin_fast/lib/; its C ABI is csrc/lavin_fast_cuda.h. The
   architectures it holds are read from its fatbinary (machine code per sm_XY, PTX for newer GPUs), and
   a device it does not cover, or a driver older than its toolkit's CUDA major, is refused (`refusals`);
2. where it is absent and CuPy is importable: the csrc/ sources compiled at first use through
   CuPy's NVRTC (cupy.RawModule), cached in memory and in CuPy's on-disk kernel cache.
`status()` says which path is in force, or why neither is. The launch configuration of path 2 is
computed here and mirrors csrc/sandwich_norm.cu (tests/test_csrc.py checks the shared limits).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import pathlib
import struct
import threading

import torch

from lavin_fast._optional import optional_import
from lavin_fast.ops._ctypes_lib import load_first, package_lib_dirs

_PKG = pathlib.Path(__file__).resolve().parents[1]  # lavin_fast/
LIB_NAME = "liblavin_fast_cuda.so"
ABI_VERSION = 1  # LAVIN_FAST_CUDA_ABI in csrc/lavin_fast_cuda.h

# Mirrors of csrc constants (checked against the built library by tests/test_csrc.py).
MAX_BLOCK_THREADS = 512
ITEMS_FWD = 4
ITEMS_BWD = 3
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CU_TYPES = {torch.float32: "float", torch.float16: "lavin::f16", torch.bfloat16: "lavin::bf16"}


def _lib_dirs() -> list[pathlib.Path]:
    """lavin_fast/lib/ folders (ops/_ctypes_lib.py); a name here so that tests can point the search elsewhere."""
    return package_lib_dirs()


def library_candidates() -> list[pathlib.Path]:
    """Where the compiled library is looked for, in order."""
    out = []
    env = os.environ.get("LAVIN_FAST_CUDA_LIB")
    if env:
        out.append(pathlib.Path(env))
    out += [d / LIB_NAME for d in _lib_dirs()]
    return out


def source_dir() -> pathlib.Path | None:
    """csrc/ as packaged (lavin_fast/csrc) or in the source tree (editable installs)."""
    for d in (_PKG / "csrc", _PKG.parent / "csrc"):
        if (d / "sandwich_norm_kernels.cuh").is_file():
            return d
    return None


def build_record(lib_path: str | os.PathLike | None = None) -> dict:
    """cuda_build.json written by CMake next to the library (lavin_fast/lib/ in a wheel): status ("built" or
    "skipped"), detail, archs, nvcc_version. {} when there is none (a build without CMake)."""
    for d in ([pathlib.Path(lib_path).parent] if lib_path else []) + _lib_dirs():
        note = d / "cuda_build.json"
        try:
            return json.loads(note.read_text())
        except (OSError, ValueError):
            continue
    return {}


def _build_note() -> str:
    rec = build_record()
    if not rec:
        return " (no cuda_build.json: a source checkout, or a wheel built with LAVIN_FAST_SKIP_CUDA_BUILD=1)"
    return f" (CUDA build {rec.get('status')}: {rec.get('detail')})"


_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def fatbin_archs(path: str | os.PathLike) -> dict[str, list[int]]:
    """{"sass": [80, 86, ...], "ptx": [90]}: the architectures inside a CUDA binary's fatbinaries.

    Fatbinary layout: a 16-byte header (magic 0xBA55ED50, version, header size, payload size), then
    entries, each a header (kind 1 = PTX, 2 = machine code; header size; payload size; ...; sm number
    at byte 28) followed by its payload."""
    data = pathlib.Path(path).read_bytes()
    sass: set[int] = set()
    ptx: set[int] = set()
    i = data.find(_FATBIN_MAGIC)
    while i != -1 and i + 16 <= len(data):
        _, _, header, size = struct.unpack_from("<IHHQ", data, i)
        off, end = i + header, min(i + header + size, len(data))
        while off + 32 <= end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
            (arch,) = struct.unpack_from("<I", data, off + 28)
            if kind == 1:
                ptx.add(arch)
            elif kind == 2:
                sass.add(arch)
            if entry_header == 0:
                break
            off += entry_header + payload
        i = data.find(_FATBIN_MAGIC, max(end, i + 4))
    return {"sass": sorted(sass), "ptx": sorted(ptx)}


def arch_covered(archs: dict[str, list[int]], capability: tuple[int, int]) -> bool:
    """Machine code for sm_XY runs on sm_XZ with Z >= Y (same major); PTX for compute_XY is compiled by the
    driver for any newer device."""
    major, minor = capability
    sm = major * 10 + minor
    return any(a // 10 == major and a <= sm for a in archs["sass"]) or any(a <= sm for a in archs["ptx"])


def describe_archs(archs: dict[str, list[int]]) -> str:
    parts = [f"sm_{a}" for a in archs["sass"]] + [f"PTX compute_{a}" for a in archs["ptx"]]
    return ", ".join(parts) or "none"


@functools.cache
def driver_version() -> tuple[int, int] | None:
    """The CUDA driver's version (major, minor) from libcuda (no context is created), or None without one."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(v)) != 0 or v.value <= 0:
            return None
    except (OSError, AttributeError):
        return None
    return v.value // 1000, (v.value % 1000) // 10


def _version_tuple(text: str) -> tuple[int, int] | None:
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def driver_check(toolkit: str | None, driver: tuple[int, int] | None, needs_ptx: bool = False) -> str | None:
    """Why a driver cannot run code from this toolkit (None if it can). CUDA's minor-version compatibility
    runs machine code on any driver of the same major; JIT-compiling PTX needs a driver at least as new."""
    tk = _version_tuple(toolkit or "")
    if tk is None or driver is None:
        return None
    if driver[0] < tk[0]:
        return f"the CUDA driver supports CUDA {driver[0]}.{driver[1]}, the library was built with CUDA {tk[0]}.{tk[1]} (needs a CUDA {tk[0]} driver)"
    if needs_ptx and driver < tk:
        return f"this device needs the library's PTX compiled by the driver: CUDA {driver[0]}.{driver[1]} driver < CUDA {tk[0]}.{tk[1]} toolkit"
    return None


@functools.cache
def library_archs() -> dict[str, list[int]] | None:
    """Architectures inside the loaded library, or None when no library loads."""
    lib, where = load_library()
    return fatbin_archs(where) if lib is not None else None


# ----------------------------------------------------------------------------------------------
# Path 1: the compiled library.
# ----------------------------------------------------------------------------------------------
def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.lavin_fast_cuda_abi_version.restype = i32
    lib.lavin_fast_cuda_abi_version.argtypes = []
    lib.lavin_fast_cuda_error_string.restype = ctypes.c_char_p
    lib.lavin_fast_cuda_error_string.argtypes = [i32]
    lib.lavin_sandwich_norm_max_d.restype = i64
    lib.lavin_sandwich_norm_max_d.argtypes = [i32, i32]
    fwd_common = [i64, i64, i64]
    lib.lavin_rms_norm_modulate_fwd.argtypes = [i32, ptr, ptr, ptr, *fwd_common, i64, i64, i64, f32, ptr]
    lib.lavin_rms_norm_modulate_bwd.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, *fwd_common] + [i64] * 5 + [f32, i64, ptr]
    lib.lavin_gated_rms_norm_residual_fwd.argtypes = [i32, ptr, ptr, ptr, ptr, *fwd_common] + [i64] * 5 + [f32, ptr]
    lib.lavin_gated_rms_norm_residual_bwd.argtypes = (
        [i32, ptr, ptr, ptr, ptr, ptr, *fwd_common] + [i64] * 5 + [f32, i64, ptr]
    )
    for name in (
        "lavin_rms_norm_modulate_fwd",
        "lavin_rms_norm_modulate_bwd",
        "lavin_gated_rms_norm_residual_fwd",
        "lavin_gated_rms_norm_residual_bwd",
    ):
        getattr(lib, name).restype = i32


@functools.cache
def load_library() -> tuple[ctypes.CDLL | None, str]:
    """(library, path) or (None, why not). Loading runs no CUDA call."""
    lib, where = load_first(library_candidates(), _declare, "lavin_fast_cuda_abi_version", ABI_VERSION)
    return (lib, where) if lib is not None else (None, where + _build_note())


# ----------------------------------------------------------------------------------------------
# Path 2: CuPy / NVRTC.
# ----------------------------------------------------------------------------------------------
NVRTC_OPTIONS = ("-std=c++17",)


def nvrtc_source(src: pathlib.Path | None = None) -> str:
    """The kernels' source for NVRTC: common.cuh and sandwich_norm_kernels.cuh inlined (not #included),
    because CuPy's on-disk cache is keyed by this text: an edited header recompiles."""
    src = src or source_dir()
    if src is None:
        raise RuntimeError("csrc/ sources not found next to the package; reinstall lavin-fast")
    kernels = (src / "sandwich_norm_kernels.cuh").read_text().replace('#include "common.cuh"', "")
    return (src / "common.cuh").read_text() + "\n" + kernels


def kernel_names() -> list[str]:
    names = []
    for cu in _CU_TYPES.values():
        vec = 4 if cu == "float" else 8
        for v in (vec, 1):
            for gated in ("false", "true"):
                for kind in ("fwd", "bwd"):
                    names.append(f"lavin::sandwich_{kind}_kernel<{cu}, {v}, {gated}>")
    return names


@functools.cache
def cupy_import_error() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as exc:
        return f"CuPy is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


_cupy_lock = threading.Lock()
_cupy_modules: dict[int, object] = {}


def _cupy_module(device_index: int):
    """The csrc/ kernels compiled by NVRTC for this device (compiled once per process and device)."""
    with _cupy_lock:
        if device_index not in _cupy_modules:
            cupy = optional_import("cupy")

            with cupy.cuda.Device(device_index):
                mod = cupy.RawModule(code=nvrtc_source(), options=NVRTC_OPTIONS, name_expressions=kernel_names())
                mod.get_function(kernel_names()[0])  # compile now, under the lock
            _cupy_modules[device_index] = mod
        return _cupy_modules[device_index]


# ----------------------------------------------------------------------------------------------
# Status and refusals.
# ----------------------------------------------------------------------------------------------
def path() -> tuple[str | None, str]:
    """("library" | "cupy" | None, detail). Runs no CUDA call."""
    lib, where = load_library()
    if lib is not None:
        return "library", f"compiled library {where}"
    err = cupy_import_error()
    if err is None:
        src = source_dir()
        if src is not None:
            return "cupy", f"CuPy NVRTC: compiles {src} at first use (no compiled library: {where})"
        return None, f"CuPy is importable but the csrc/ sources are missing; no compiled library: {where}"
    return None, f"no compiled library ({where}); {err}"


def status() -> tuple[bool, str]:
    """(usable here?, which path loaded or why not). Loads the library; starts no CUDA work."""
    kind, detail = path()
    if kind is None:
        return False, detail
    if not torch.cuda.is_available():
        return False, f"{detail}; but no CUDA device"
    return True, detail


def vector_width(dtype: torch.dtype, D: int, tensors: list[torch.Tensor]) -> int:
    """16-byte vectors when D, row strides and pointers allow it (as pick_vec in csrc/sandwich_norm.cu)."""
    v = 16 // dtype.itemsize
    if D % v:
        return 1
    for t in tensors:
        if t.data_ptr() % 16:
            return 1
        if any(s % v for s in t.stride()[:-1]):
            return 1
    return v


def max_d(dtype: torch.dtype, vectorized: bool) -> int:
    """Widest row: as lavin_sandwich_norm_max_d (the backward holds ITEMS_BWD vectors per thread)."""
    vec = 16 // dtype.itemsize if vectorized else 1
    return MAX_BLOCK_THREADS * ITEMS_BWD * vec


def refusals(*tensors: torch.Tensor) -> list[str]:
    """Why the CUDA C++ kernels cannot take these tensors (first one [B, L, D] or [B, D])."""
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices):
        return [f"tensors on {sorted(str(d) for d in devices)}; the CUDA C++ kernels need CUDA tensors"]
    if len(devices) > 1:
        return [f"tensors on several devices {sorted(str(d) for d in devices)}"]
    usable, detail = status()
    if not usable:
        return [detail]
    reasons = []
    dev = next(iter(devices))
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 0):
        reasons.append("the kernels need sm_80 or newer (bf16 conversions)")
    elif path()[0] == "library":
        archs = library_archs()
        if not arch_covered(archs, cap):
            reasons.append(
                f"the compiled library holds {describe_archs(archs)}, nothing that runs on sm_{cap[0]}{cap[1]} "
                "(rebuild with LAVIN_FAST_CUDA_ARCHS including it)"
            )
        else:
            needs_ptx = not any(a // 10 == cap[0] and a <= cap[0] * 10 + cap[1] for a in archs["sass"])
            why = driver_check(build_record(load_library()[1]).get("nvcc_version"), driver_version(), needs_ptx)
            if why:
                reasons.append(why)
    dtype = tensors[0].dtype
    if dtype not in DTYPE_CODES:
        reasons.append(f"dtype {dtype} unsupported (float32, float16, bfloat16)")
        return reasons
    D = tensors[0].shape[-1]
    vec = vector_width(dtype, D, list(tensors))
    if D > max_d(dtype, vec > 1):
        reasons.append(
            f"D={D} exceeds {max_d(dtype, vec > 1)} for {dtype} with "
            f"{'16-byte aligned' if vec > 1 else 'unaligned (scalar)'} rows"
        )
    return reasons


# ----------------------------------------------------------------------------------------------
# Launch wrappers (torch tensors in, torch tensors out). Callers validate; rows have stride 1.
# ----------------------------------------------------------------------------------------------
def _config(D: int, vec: int, items: int) -> tuple[int, int]:
    """(threads per row, rows per block), as make_config in csrc/sandwich_norm.cu."""
    nvec = D // vec
    need = -(-nvec // items)
    tpr = 1 if need <= 1 else 1 << (need - 1).bit_length() if need <= 32 else -(-need // 32) * 32
    if need > MAX_BLOCK_THREADS:
        raise ValueError(f"D={D} is too wide for the CUDA kernels")
    return tpr, (1 if tpr >= 128 else 128 // tpr)


def _launch(fn_name: str, gated: bool, kind: str, dtype: torch.dtype, device: torch.device, ptrs, sizes_strides,
            eps: float, rows_per_group: int | None, vec_tensors: list[torch.Tensor]) -> None:  # fmt: skip
    """Run one kernel through the library or CuPy on torch's current stream of `device`."""
    stream = torch.cuda.current_stream(device).cuda_stream
    which, _ = path()
    if which == "library":
        lib, _ = load_library()
        args = [DTYPE_CODES[dtype], *ptrs, *sizes_strides, ctypes.c_float(eps)]
        if rows_per_group is not None:
            args.append(rows_per_group)
        with torch.cuda.device(device):
            code = getattr(lib, fn_name)(*args, ctypes.c_void_p(stream))
        if code != 0:
            msg = lib.lavin_fast_cuda_error_string(code).decode()
            raise RuntimeError(f"{fn_name} failed with code {code}: {msg}")
        return
    if which != "cupy":
        raise RuntimeError(f"the CUDA C++ kernels are unusable: {status()[1]}")
    cupy = optional_import("cupy")
    import numpy as np

    B, L, D = sizes_strides[:3]
    strides = sizes_strides[3:]
    vec = vector_width(dtype, D, vec_tensors)
    tpr, rpb = _config(D, vec, ITEMS_FWD if kind == "fwd" else ITEMS_BWD)
    name = f"lavin::sandwich_{kind}_kernel<{_CU_TYPES[dtype]}, {vec}, {'true' if gated else 'false'}>"
    i64 = np.int64
    p = [np.uint64(x or 0) for x in ptrs]
    if kind == "fwd":
        rows = B * L
        if rows == 0:
            return
        # kernel order: x, vec, res, out, rows, L, D, sxb, sxl, svb, srb, srl, eps
        if gated:  # C order: residual, h, gate, out; strides rb, rl, hb, hl, gb
            srb, srl, shb, shl, sgb = strides
            args = (p[1], p[2], p[0], p[3], i64(rows), i64(L), np.int32(D), i64(shb), i64(shl), i64(sgb), i64(srb),
                    i64(srl), np.float32(eps))  # fmt: skip
        else:
            sxb, sxl, ssb = strides
            args = (p[0], p[1], np.uint64(0), p[2], i64(rows), i64(L), np.int32(D), i64(sxb), i64(sxl), i64(ssb),
                    i64(0), i64(0), np.float32(eps))  # fmt: skip
        blocks = -(-rows // rpb)
    else:
        G = -(-L // rows_per_group)
        groups = B * G
        if groups == 0:
            return
        # kernel order: x, vec, dy, dx, partial, groups, G, L, D, sxb, sxl, svb, sdb, sdl, eps, rows_per_group
        args = (*p, i64(groups), i64(G), i64(L), np.int32(D), *(i64(s) for s in strides), np.float32(eps),
                np.int32(rows_per_group))  # fmt: skip
        blocks = -(-groups // rpb)
    with cupy.cuda.Device(device.index):
        fn = _cupy_module(device.index).get_function(name)
        with cupy.cuda.ExternalStream(stream):  # RawKernel launches on CuPy's current stream
            fn((blocks,), (tpr, rpb), args)


def rms_norm_modulate_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    B, L, D = x.shape
    y = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    _launch("lavin_rms_norm_modulate_fwd", False, "fwd", x.dtype, x.device,
            [x.data_ptr(), scale.data_ptr(), y.data_ptr()],
            [B, L, D, x.stride(0), x.stride(1), scale.stride(0)], eps, None, [x, scale, y])  # fmt: skip
    return y


def gated_rms_norm_residual_fwd(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float
) -> torch.Tensor:
    B, L, D = h.shape
    out = torch.empty((B, L, D), dtype=h.dtype, device=h.device)
    _launch("lavin_gated_rms_norm_residual_fwd", True, "fwd", h.dtype, h.device,
            [residual.data_ptr(), h.data_ptr(), gate.data_ptr(), out.data_ptr()],
            [B, L, D, residual.stride(0), residual.stride(1), h.stride(0), h.stride(1), gate.stride(0)], eps, None,
            [residual, h, gate, out])  # fmt: skip
    return out


def _bwd(fn_name: str, gated: bool, dy, x, vec, eps: float, rows_per_group: int):
    B, L, D = x.shape
    if vector_width(x.dtype, D, [dy]) == 1 and vector_width(x.dtype, D, [x, vec]) > 1:
        # a misaligned upstream gradient would force the scalar path (and its narrower D limit)
        # on a backward whose forward was vectorized: a fresh, aligned copy costs one pass over dy
        dy = dy.clone(memory_format=torch.contiguous_format)
    G = -(-L // rows_per_group)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    part = torch.empty((B, G, D), dtype=torch.float32, device=x.device)
    _launch(fn_name, gated, "bwd", x.dtype, x.device,
            [x.data_ptr(), vec.data_ptr(), dy.data_ptr(), dx.data_ptr(), part.data_ptr()],
            [B, L, D, x.stride(0), x.stride(1), vec.stride(0), dy.stride(0), dy.stride(1)], eps, rows_per_group,
            [x, vec, dy, dx, part])  # fmt: skip
    return dx, part


def rms_norm_modulate_bwd(dy, x, scale, eps, rows_per_group):
    """(dx, float32 partial sums [B, G, D] of dy * RMSNorm(x) over groups of rows_per_group tokens)."""
    return _bwd("lavin_rms_norm_modulate_bwd", False, dy, x, scale, eps, rows_per_group)


def gated_rms_norm_residual_bwd(dout, h, gate, eps, rows_per_group):
    """(dh, float32 partial sums [B, G, D] of dout * RMSNorm(h); dgate = sum * (1 - tanh(gate)^2))."""
    return _bwd("lavin_gated_rms_norm_residual_bwd", True, dout, h, gate, eps, rows_per_group)
