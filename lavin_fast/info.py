"""Versions, devices, and which kernel backends are usable here (and, for each that is not, why)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform


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
        if key in ("backends", "cuda_devices"):
            continue
        print(f"{key:>12}: {value}")
    if info["cuda_devices"]:
        for d in info["cuda_devices"]:
            print(
                f"{'device':>12}: cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}, {d['memory_gib']} GiB)"
            )
    else:
        print(f"{'device':>12}: no CUDA device; ops run on the CPU reference path")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:<7} {'usable' if b['usable'] else 'unusable':<9} {b['detail']}")
    return 0
