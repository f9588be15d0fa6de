"""The CUDA C++ sandwich-norm kernels (csrc/) in the static sm_90 report, read from their nvcc cubin.

csrc/sandwich_norm.cu is compiled by nvcc for sm_90 to a cubin (as CMake's Release build: -O3,
C++17), cached by the sources' and nvcc's hash; cuobjdump gives each kernel's registers, shared
memory and SASS, which go through the same analysis and model as the Triton kernels
(perf/sass_model.py). The kernels are memory-bound: the report adds the bytes each moves per
element of its row (from the SASS: loads and stores x width per vector of elements), the load
width, and the estimated GB/s at the row width the spec stands for, with the launch
configuration of csrc/sandwich_norm.cu (mirrored by ops/_cuda.py).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict

from lavin_fast.ops import _cuda
from lavin_fast.perf.aot import TARGET_ARCH, AotResult, _problems, cache_dir, cuobjdump
from lavin_fast.perf.sass_model import GPUS, analyse_sass, estimate, load_kind, occupancy, parse_sass

NVCC_FLAGS = ("-cubin", f"-arch=sm_{TARGET_ARCH}", "-O3", "-DNDEBUG", "-std=c++17", "-DLAVIN_FAST_BUILDING=1",
              "-Xptxas=-v")  # fmt: skip
# the rows reported: bf16 with 16-byte vectors (the default path) at the J-DiT widths
WIDTHS = ((512, "0.1B"), (1024, "1.0B"), (2304, "3.4B"))
_MANGLED_RE = re.compile(r"sandwich_(fwd|bwd)_kernelI(NS_4bf16E|NS_3f16E|f)Li(\d+)ELb([01])E")
_DTYPES = {"NS_4bf16E": ("bf16", 2), "NS_3f16E": ("f16", 2), "f": ("f32", 4)}
_USAGE_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_PTXAS_RE = re.compile(
    r"Compiling entry function '(\S+)' for 'sm_\d+'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads",
    re.S,
)


def nvcc_path() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand):
            return cand
    return None


def compile_cubin(src: pathlib.Path, nvcc: str) -> tuple[bytes, str]:
    """(cubin, ptxas log) of csrc/sandwich_norm.cu for sm_90; cached by sources, nvcc and flags."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256(version.encode() + " ".join(NVCC_FLAGS).encode())
    for f in sorted(src.glob("*.cu*")) + sorted(src.glob("*.h")):
        h.update(f.name.encode() + f.read_bytes())
    cache = pathlib.Path(cache_dir("csrc_cubin")) / h.hexdigest()[:32]
    if (cache / "k.cubin").is_file() and (cache / "ptxas.log").is_file():
        return (cache / "k.cubin").read_bytes(), (cache / "ptxas.log").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "k.cubin")
        proc = subprocess.run([nvcc, *NVCC_FLAGS, f"-I{src}", str(src / "sandwich_norm.cu"), "-o", out],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"nvcc failed: {(proc.stdout + proc.stderr).strip()[-1500:]}")
        cubin, log = pathlib.Path(out).read_bytes(), proc.stdout + proc.stderr
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "k.cubin").write_bytes(cubin)
    (cache / "ptxas.log").write_text(log)
    return cubin, log


def describe(mangled: str) -> dict | None:
    """kind, dtype, element size, vector width and gating of a sandwich kernel's mangled name."""
    m = _MANGLED_RE.search(mangled)
    if not m:
        return None
    kind, t, vec, gated = m.groups()
    dtype, size = _DTYPES[t]
    return {"kind": kind, "dtype": dtype, "elem_bytes": size, "vec": int(vec), "gated": gated == "1"}


def launch_config(D: int, vec: int, kind: str) -> tuple[int, int]:
    """(threads per row, rows per block) as csrc/sandwich_norm.cu's make_config."""
    return _cuda._config(D, vec, _cuda.ITEMS_FWD if kind == "fwd" else _cuda.ITEMS_BWD)


def report(gpu: str) -> list[dict]:
    """One result dict per reported CUDA kernel and row width; [] with a note when nvcc or csrc/ is
    missing (raises nothing: the Triton report goes on)."""
    src, nvcc = _cuda.source_dir(), nvcc_path()
    if src is None or nvcc is None:
        return []
    cubin, log = compile_cubin(src, nvcc)
    usage, sass = cuobjdump(cubin)
    resources = {m[0]: tuple(int(v) for v in m[1:]) for m in _USAGE_RE.findall(usage)}
    spills = {m[0]: int(m[2]) + int(m[3]) for m in _PTXAS_RE.findall(log)}
    funcs = parse_sass(sass)
    rows = []
    for name in sorted(funcs, key=lambda n: (describe(n) or {}).get("gated", False)):
        d = describe(name)
        if d is None or d["dtype"] != "bf16" or d["vec"] == 1:
            continue
        a = analyse_sass(funcs[name])
        reg, stack, shared, local = resources.get(name, (0, 0, 0, 0))
        items = _cuda.ITEMS_FWD if d["kind"] == "fwd" else _cuda.ITEMS_BWD
        # bytes per element: one pass (the backward: one row of its loop) of global accesses per thread,
        # over the items x vec elements the thread covers
        per_elem = (a["global_bytes_in"] + a["global_bytes_out"]) / 32 / (items * d["vec"])
        for D, what in WIDTHS:
            tpr, rpb = launch_config(D, d["vec"], d["kind"])
            threads = tpr * rpb
            warps = -(-threads // 32)
            # a thread covers items x vec elements, the masked-off ones move nothing
            active = D * rpb / (threads * items * d["vec"])
            scaled = dict(
                a, global_bytes_in=a["global_bytes_in"] * active, global_bytes_out=a["global_bytes_out"] * active
            )
            ctas, limit = occupancy(reg, shared, warps)
            est = estimate(scaled, warps, ctas, GPUS[gpu])
            op = "gated_rms_norm_residual" if d["gated"] else "rms_norm_modulate"
            r = AotResult(op=op, kernel=f"cuda sandwich_{d['kind']}_kernel<bf16,{d['vec']},{str(d['gated']).lower()}>",
                          label=f"CUDA C++ {what} D={D} bf16 vec{d['vec']} {tpr}x{rpb} threads",
                          num_warps=warps, num_stages=1)  # fmt: skip
            r.registers, r.stack_bytes, r.shared_bytes, r.local_bytes = reg, stack, shared, local
            r.spill_bytes = spills.get(name, local + stack)
            r.hgmma = 0
            r.ctas_per_sm, r.occupancy_limit = ctas, limit
            r.hgmma_per_iter, r.hgmma_shapes, r.mma_flops_per_iter = 0, {}, 0
            r.waits_per_iter = r.full_waits_per_iter = r.arrives_per_iter = 0
            r.non_mma_per_iter, r.mufu_per_iter, r.mufu_kinds = a["non_mma"], a["mufu"], a["mufu_kinds"]
            r.loads_per_iter = a["loads"]
            r.smem_per_iter = {"LDS": a["lds"], "STS": a["sts"], "LDSM": a["ldsm"]}
            r.bar_syncs_per_iter = a["bar_syncs"]
            r.global_bytes_per_iter = round((scaled["global_bytes_in"] + scaled["global_bytes_out"]) * warps)
            r.load_kind, r.has_loop = load_kind(a["loads"]), a["has_loop"]
            r.est_gbps, r.est_bound = round(est.est_gbps or 0.0, 1), est.bound
            r.est_cycles, r.est_gpu = est.terms, GPUS[gpu].name
            r.bytes_per_elem = round(per_elem, 2)
            r.problems = _problems(r)
            rows.append(asdict(r))
    return rows
