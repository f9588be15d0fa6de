"""Versions, devices, and which kernel backends are usable here (and, for each that is not, why).

Also loads the CUDA C++ library and lists the architectures inside it, and checks the CUDA driver against
the toolkit that built the library and against the CUDA major of the installed DALI wheel.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform

DALI_DISTRIBUTIONS = {"nvidia-dali-cuda120": 12, "nvidia-dali-cuda130": 13}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def backend_status() -> dict[str, dict]:
    """backend name -> {"usable": bool, "detail": str}. Probes; starts no CUDA work."""
    import torch

    from lavin_fast.ops._triton import interpreter_active, triton_import_error

    out = {"torch": {"usable": True, "detail": "plain PyTorch reference (any device)"}}
    err = triton_import_error()
    if err:
        out["triton"] = {"usable": False, "detail": err}
    elif torch.cuda.is_available():
        out["triton"] = {"usable": True, "detail": "CUDA device present"}
    elif interpreter_active():
        out["triton"] = {"usable": True, "detail": "CPU interpreter (TRITON_INTERPRET=1): for tests, slow"}
    else:
        out["triton"] = {
            "usable": False,
            "detail": "no CUDA device (kernels still compile ahead of time: `lavin-fast kernels --report`)",
        }
    try:
        _cuda = importlib.import_module("lavin_fast.ops._cuda")
    except ModuleNotFoundError as exc:
        if exc.name != "lavin_fast.ops._cuda":
            raise
        out["cuda"] = {"usable": False, "detail": "this build has no CUDA C++ kernels"}
    else:
        usable, detail = _cuda.status()
        out["cuda"] = {"usable": usable, "detail": detail}
    return out


def cuda_library() -> dict:
    """The compiled CUDA library: loaded (path) or why not, its architectures, its build record, and
    whether this machine's driver can run it."""
    from lavin_fast.ops import _cuda

    lib, where = _cuda.load_library()
    record = _cuda.build_record(where if lib is not None else None)
    driver = _cuda.driver_version()
    out = {
        "loaded": lib is not None,
        "where": where,
        "archs": _cuda.describe_archs(_cuda.library_archs()) if lib is not None else None,
        "build": record,
        "driver": f"{driver[0]}.{driver[1]}" if driver else None,
    }
    if driver is None:
        out["driver_check"] = "no CUDA driver (libcuda.so.1 not found)"
    elif lib is None:
        out["driver_check"] = "no library to check"
    else:
        why = _cuda.driver_check(record.get("nvcc_version"), driver)
        out["driver_check"] = (
            why or f"ok: CUDA {out['driver']} driver runs code from the CUDA {record.get('nvcc_version')} toolkit"
        )
    return out


def cpu_library() -> dict:
    """The CPU kernel library (csrc/cpu_fused.cpp): in use (path, instruction set) or why not, and its build record."""
    import json as _json

    from lavin_fast.ops import _cpu

    usable, detail = _cpu.status()
    record = {}
    for path in _cpu.library_candidates():
        try:
            record = _json.loads((path.parent / "cpu_build.json").read_text())
            break
        except (OSError, ValueError):
            continue
    return {"in_use": usable, "detail": detail, "build": record}


def dali_check() -> dict:
    """Which DALI wheel is installed (its CUDA major) and whether the driver is new enough for it."""
    from lavin_fast.ops import _cuda

    found = {}
    for dist, major in DALI_DISTRIBUTIONS.items():
        try:
            found[dist] = (importlib.metadata.version(dist), major)
        except importlib.metadata.PackageNotFoundError:
            continue
    if not found:
        return {"installed": None, "check": "not installed (extras [dali-cu12] / [dali-cu13])"}
    driver = _cuda.driver_version()
    checks = []
    for dist, (version, major) in found.items():
        if driver is None:
            checks.append(f"{dist} {version}: no CUDA driver here (its CPU pipelines still run)")
        elif driver[0] < major:
            checks.append(
                f"{dist} {version} needs a CUDA {major} driver, this one supports CUDA {driver[0]}.{driver[1]}: "
                f"install lavin-fast[dali-cu{driver[0]}] instead"
            )
        else:
            checks.append(f"{dist} {version}: ok with the CUDA {driver[0]}.{driver[1]} driver")
    return {"installed": {d: v for d, (v, _) in found.items()}, "check": "; ".join(checks)}


def collect() -> dict:
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "lavin_fast": _version("lavin_fast"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "cupy": _version("cupy"),
        "flash_attn": _version("flash_attn"),
        "apex": _version("apex"),
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": devices,
        "cuda_library": cuda_library(),
        "cpu_library": cpu_library(),
        "dali_driver": dali_check(),
        "backends": backend_status(),
    }


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key in ("backends", "cuda_devices", "cuda_library", "cpu_library", "dali_driver"):
            continue
        print(f"{key:>12}: {value}")
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            print(
                f"{'device':>12}: cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}, {d['memory_gib']} GiB)"
            )
    else:
        print(f"{'device':>12}: no CUDA device; ops run on the CPU reference path")
    lib = info["cuda_library"]
    print("cuda library:")
    if lib["loaded"]:
        print(f"  loaded   {lib['where']}")
        print(f"  archs    {lib['archs']}")
    else:
        print(f"  not loaded: {lib['where']}")
    if lib["build"]:
        print(f"  build    {lib['build'].get('status')}: {lib['build'].get('detail')}")
    print(f"  driver   {lib['driver_check']}")
    cpu = info["cpu_library"]
    print("cpu kernels:")
    print(f"  {'in use' if cpu['in_use'] else 'not used'}   {cpu['detail']}")
    if cpu["build"]:
        print(f"  build    {cpu['build'].get('status')}: {cpu['build'].get('detail')}")
    print(f"dali: {info['dali_driver']['check']}")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:<7} {'usable' if b['usable'] else 'unusable':<9} {b['detail']}")
    return 0
