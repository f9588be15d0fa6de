"""The CPU C++ kernels of csrc/cpu_fused.cpp: loading and status (the bindings are lavin_fast/ops/cpu_fused.py).

The library liblavin_fast_cpu.so is built by CMake with the system C++ compiler during `pip install` (next to the
CUDA library, with no torch headers: a C ABI, csrc/lavin_fast_cpu.h) and loaded with ctypes at first use from
$LAVIN_FAST_CPU_LIB or lavin_fast/lib/. It shares torch's OpenMP runtime (the same libgomp.so.1, already loaded).

LAVIN_FAST_CPU_KERNELS=0 turns the kernels off (the torch forms run instead: the A/B switch of the benchmarks).
Where the library is absent the torch forms run; `lavin-fast info` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib

from lavin_fast.ops._ctypes_lib import load_first, package_lib_dirs

LIB_NAME = "liblavin_fast_cpu.so"
ABI_VERSION = 1  # LAVIN_FAST_CPU_ABI in csrc/lavin_fast_cpu.h
ENV_SWITCH = "LAVIN_FAST_CPU_KERNELS"


def library_candidates() -> list[pathlib.Path]:
    """Where the library is looked for, in order: $LAVIN_FAST_CPU_LIB, then lib/ of each package folder."""
    out = [pathlib.Path(os.environ["LAVIN_FAST_CPU_LIB"])] if os.environ.get("LAVIN_FAST_CPU_LIB") else []
    return list(dict.fromkeys(out + [d / LIB_NAME for d in package_lib_dirs()]))


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.lavin_fast_cpu_abi_version.restype = i32
    lib.lavin_fast_cpu_abi_version.argtypes = []
    lib.lavin_fast_cpu_isa.restype = ctypes.c_char_p
    lib.lavin_fast_cpu_isa.argtypes = []
    signatures = {
        "lavin_cpu_rms_modulate_fwd": [ptr, ptr, i64, i64, i64, f32, ptr, ptr, i32],
        "lavin_cpu_rms_modulate_bwd": [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32],
        "lavin_cpu_gated_fwd": [ptr, ptr, ptr, i64, i64, i64, f32, ptr, ptr, i32],
        "lavin_cpu_gated_bwd": [ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i32],
        "lavin_cpu_swiglu_fwd": [ptr, i64, i64, ptr, i32],
        "lavin_cpu_swiglu_bwd": [ptr, ptr, i64, i64, ptr, i32],
        "lavin_cpu_qkv_prep_fwd": [ptr] + [i64] * 7 + [ptr] * 6 + [f32, ptr, ptr, i64, i64, ptr, i32],
        "lavin_cpu_qkv_prep_bwd": [ptr] * 4 + [i64] * 7 + [ptr] * 6 + [i64, i64, ptr, ptr, i32],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = i32


@functools.cache
def load_library() -> tuple[ctypes.CDLL | None, str]:
    """(library, path) or (None, why not)."""
    import torch  # noqa: F401  (torch's libgomp first: the library then binds to the same OpenMP runtime)

    lib, where = load_first(library_candidates(), _declare, "lavin_fast_cpu_abi_version", ABI_VERSION)
    if lib is None:
        return None, where + " (built by `pip install` with a C++ compiler and CMake)"
    return lib, where


def switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The loaded library when the kernels are on and it loads, else None (read at every call: the switch is live)."""
    if switched_off():
        return None
    return load_library()[0]


def status() -> tuple[bool, str]:
    """(in use?, which library and instruction set, or why not)."""
    if switched_off():
        return False, f"{ENV_SWITCH}=0: the torch forms run"
    lib, where = load_library()
    if lib is None:
        return False, f"no CPU kernel library ({where}): the torch forms run"
    return True, f"{where} ({lib.lavin_fast_cpu_isa().decode()} row loops)"
