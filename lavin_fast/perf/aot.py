"""Ahead-of-time compilation of every registered Triton kernel for Hopper (sm_90), no GPU needed.

Each op module registers (lavin_fast.ops.aot.register_aot) a function returning `AotSpec`s (a kernel, its argument types and
the constexprs of a representative configuration). `report()` compiles each with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` and reads the cubin with
the `cuobjdump` shipped inside Triton's package: registers, local memory (spills), shared
memory, ptxas's spill bytes, and the number of HGMMA (Hopper wgmma) instructions in the SASS.

Triton kernels are defined as interpreter functions when TRITON_INTERPRET=1, which cannot be
compiled; `report()` then reruns itself in a child process without that variable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from lavin_fast.ops import load_all_op_modules
from lavin_fast.ops.aot import ANCHOR_OP, AotSpec, registered_specs
from lavin_fast.perf.sass_model import DEFAULT_GPU, GPUS, analyse_sass, estimate, load_kind, occupancy, parse_sass

TARGET_ARCH = 90
WARP_SIZE = 32


@dataclass
class AotResult:
    op: str
    kernel: str
    label: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    hgmma: int | None = None
    spill_bytes: int | None = None
    compile_s: float | None = None
    expect_hgmma: bool = False
    hot: bool = True
    # the static performance model (perf/sass_model.py); per iteration of the main inner loop
    ctas_per_sm: int | None = None
    occupancy_limit: str | None = None
    hgmma_per_iter: int | None = None
    hgmma_shapes: dict[str, int] | None = None  # "64x256x16.SS" -> count per warp
    mma_flops_per_iter: int | None = None  # per CTA (all warpgroups; HMMA of all warps included)
    hmma_per_iter: int | None = None  # warp-level mma.sync per warp (Triton's fallback to MMA v2)
    waits_per_iter: int | None = None  # WARPGROUP.DEPBAR (wgmma waits) per warp
    full_waits_per_iter: int | None = None  # of which leave no wgmma in flight
    arrives_per_iter: int | None = None
    non_mma_per_iter: int | None = None  # per warp
    mufu_per_iter: int | None = None  # per warp
    mufu_kinds: dict[str, int] | None = None
    loads_per_iter: dict[str, int] | None = None  # global loads/stores by kind.width, per warp
    smem_per_iter: dict[str, int] | None = None  # LDS / STS / LDSM per warp
    bar_syncs_per_iter: int | None = None
    global_bytes_per_iter: int | None = None  # per CTA
    load_kind: str | None = None
    has_loop: bool | None = None
    rare_path_instructions: int | None = None  # per warp: libdevice's sin/cos slow path, not counted
    cta_warps: int | None = None  # the compiled CTA's warps: more than num_warps when warp specialisation adds some
    est_tflops: float | None = None
    est_gbps: float | None = None
    est_bound: str | None = None
    est_cycles: dict[str, float] | None = None  # the model's terms, cycles per CTA-iteration
    est_gpu: str | None = None
    bytes_per_elem: float | None = None  # CUDA C++ row kernels: global bytes per row element (SASS)
    error: str | None = None
    error_detail: str | None = None  # the compiler's whole message (its tail), printed by the CLI
    problems: list[str] = field(default_factory=list)


def _nvidia_bin(tool: str) -> str:
    """The path of one of Triton's NVIDIA tools: for ptxas the one Triton itself runs for sm_90 (its
    `TRITON_PTXAS_PATH` knob, else the copy in its package), so that the report reads the PTX of the Triton in
    use with the assembler that Triton pairs with it; cuobjdump from the same place."""
    from triton import knobs

    found = getattr(knobs.nvidia, tool.replace("-", "_"), None)
    if found is None:
        raise FileNotFoundError(f"{tool} not found: Triton's knobs name no such NVIDIA tool")
    return found.path


def _ptx_isa(version: str) -> int:
    """'8.7' -> 87, the way Triton numbers PTX ISA versions."""
    major, minor = (int(x) for x in version.split(".")[:2])
    return 10 * major + minor


def toolchain(arch: int = TARGET_ARCH) -> dict[str, Any]:
    """Triton's version, the ptxas it runs for `arch` (path, CUDA release), the PTX ISA version that Triton
    emits for it and the newest PTX ISA version that ptxas reads."""
    import triton
    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(arch)
    readable = nv.ptx_get_version(tool.version)  # the PTX ISA of ptxas's own CUDA release
    try:  # what Triton's compiler itself will write into the PTX (options.ptx_version, else from ptxas)
        emitted = int(nv.get_ptx_version_from_options(nv.CUDAOptions(), arch))
    except Exception:  # a Triton whose internals differ: each kernel's PTX is still checked (check_ptx_version)
        emitted = readable
    return {"triton": triton.__version__, "ptxas": tool.path, "ptxas_release": tool.version,
            "ptx_emitted": emitted, "ptx_readable": readable}  # fmt: skip


def check_toolchain(info: dict[str, Any] | None = None) -> dict[str, Any]:
    """RuntimeError naming both versions when the ptxas in use cannot read the PTX of the Triton in use (checked
    before any kernel is compiled); else the toolchain() dict."""
    info = info or toolchain()
    if info["ptx_emitted"] > info["ptx_readable"]:
        e, r = info["ptx_emitted"], info["ptx_readable"]
        raise RuntimeError(
            f"Triton {info['triton']} emits PTX ISA {e // 10}.{e % 10}, but its ptxas for sm_{TARGET_ARCH} "
            f"({info['ptxas']}, CUDA {info['ptxas_release']}) reads PTX ISA up to {r // 10}.{r % 10}: install the "
            f"Triton version this package pins, or point TRITON_PTXAS_PATH at a ptxas of CUDA {e // 10 + 4}.{e % 10} or newer"
        )
    return info


_TOOLCHAIN: dict[str, Any] = {}


def _toolchain_once() -> dict[str, Any]:
    if not _TOOLCHAIN:
        _TOOLCHAIN.update(toolchain())
    return _TOOLCHAIN


def check_ptx_version(ptx: str, info: dict[str, Any]) -> None:
    """RuntimeError naming both versions when a kernel's PTX declares an ISA newer than ptxas reads."""
    m = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    if m and _ptx_isa(m.group(1)) > info["ptx_readable"]:
        r = info["ptx_readable"]
        raise RuntimeError(
            f"Triton {info['triton']} wrote PTX .version {m.group(1)}, which the ptxas in use ({info['ptxas']}, "
            f"CUDA {info['ptxas_release']}) cannot read (it reads up to {r // 10}.{r % 10})"
        )


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump(cubin: bytes) -> tuple[str, str]:
    """(resource usage, SASS) text of a cubin, from the cuobjdump shipped inside Triton's package."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        tool = _nvidia_bin("cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True)
    finally:
        os.unlink(path)
    return usage.stdout, sass.stdout


def inspect_cubin(cubin: bytes) -> dict[str, Any]:
    """Registers, stack, static shared, local bytes, HGMMA count and SASS of a single-kernel cubin."""
    usage, sass = cuobjdump(cubin)
    m = _RESOURCE_RE.search(usage)
    if not m:
        raise RuntimeError(f"could not parse cuobjdump resource usage:\n{usage}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {
        "registers": reg,
        "stack_bytes": stack,
        "static_shared": shared,
        "local_bytes": local,
        "hgmma": sum(1 for line in sass.splitlines() if "HGMMA" in line),
        "sass": sass,
    }


_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(ptx: str, arch: int = TARGET_ARCH) -> int:
    """Spill bytes (stores + loads) that ptxas reports for the PTX; the real spill count, unlike
    local/stack bytes, which also cover local arrays (e.g. libdevice's sin/cos range reduction)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_nvidia_bin("ptxas"), "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RuntimeError(f"ptxas failed (rc {out.returncode}): {(out.stderr or out.stdout).strip()[-3000:]}")
    return sum(int(a) + int(b) for a, b in _SPILL_RE.findall(out.stdout + out.stderr))


def cache_dir(what: str) -> str:
    """~/.cache/lavin_fast/<what> (XDG_CACHE_HOME respected): the report's caches of tool output."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lavin_fast", what)


def cached_inspection(cubin: bytes, ptx: str) -> dict[str, Any]:
    """inspect_cubin + ptxas_spills, cached on disk by the cubin's and PTX's hash (a warm report then
    runs neither cuobjdump nor ptxas; the SASS is kept, so a change of the model needs no rebuild)."""
    import hashlib

    key = hashlib.sha256(cubin + ptx.encode()).hexdigest()[:40]
    path = os.path.join(cache_dir("sass"), f"{key}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    info = inspect_cubin(cubin)
    info["spill_bytes"] = ptxas_spills(ptx)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except OSError:  # a read-only home: no cache, same result
        pass
    return info


def apply_model(res: AotResult, sass: str, spec: AotSpec, gpu: str = DEFAULT_GPU) -> None:
    """Fill `res`'s model fields from the kernel's SASS (res.registers/shared_bytes already set)."""
    funcs = parse_sass(sass)
    insns = max(funcs.values(), key=len) if funcs else []
    a = analyse_sass(insns)
    # the compiled CTA's warps: warp specialisation adds partitions (Triton's 4-warp forward runs 12 warps, each
    # launched with the kernel's register count), so occupancy counts them all, not the spec's num_warps
    warps = max(res.cta_warps or 0, res.num_warps)
    res.ctas_per_sm, res.occupancy_limit = occupancy(res.registers or 0, res.shared_bytes or 0, warps)
    res.hgmma_per_iter = a["hgmma"]
    res.hgmma_shapes = a["hgmma_shapes"]
    res.mma_flops_per_iter = a["mma_flops"] * max(res.num_warps // 4, 1) + a["hmma_flops"] * res.num_warps
    res.hmma_per_iter = a["hmma"]
    res.waits_per_iter = a["waits"]
    res.full_waits_per_iter = a["waits_full"]
    res.arrives_per_iter = a["arrives"]
    res.non_mma_per_iter = a["non_mma"]
    res.mufu_per_iter = a["mufu"]
    res.mufu_kinds = a["mufu_kinds"]
    res.loads_per_iter = a["loads"]
    res.smem_per_iter = {"LDS": a["lds"], "STS": a["sts"], "LDSM": a["ldsm"]}
    res.bar_syncs_per_iter = a["bar_syncs"]
    res.global_bytes_per_iter = (a["global_bytes_in"] + a["global_bytes_out"]) * res.num_warps
    res.load_kind = load_kind(a["loads"])
    res.has_loop = a["has_loop"]
    res.rare_path_instructions = a.get("rare_path_instructions", 0)
    res.analysis = a  # not a dataclass field: kept for re-estimation (the calibration), never serialised
    est = estimate(a, res.num_warps, res.ctas_per_sm, GPUS[gpu], spec.programs, spec.iters_per_program,
                   spec.useful_flops, spec.useful_bytes, num_stages=res.num_stages, l2_bytes=spec.l2_bytes)  # fmt: skip
    res.est_tflops = None if est.est_tflops is None else round(est.est_tflops, 1)
    res.est_gbps = None if est.est_gbps is None else round(est.est_gbps, 1)
    res.est_bound = est.bound
    res.est_cycles = est.terms
    res.est_gpu = GPUS[gpu].name


def triton_compile(spec: AotSpec):
    """Compile one spec's Triton kernel for sm_90 as the report does (pointer and `aligned` arguments marked
    16-byte divisible); returns Triton's compiled kernel (`.asm["sass"/"cubin"/"ttgir"]`, `.metadata`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {}
    for i, arg in enumerate(spec.kernel.arg_names):
        ty = spec.signature.get(arg)
        if ty is None:
            raise ValueError(f"signature lacks argument {arg!r}")
        if ty.startswith("*") or arg in spec.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )


def compile_spec(spec: AotSpec, gpu: str = DEFAULT_GPU) -> AotResult:
    """Compile one spec for sm_90 and inspect the cubin."""
    name = getattr(spec.kernel, "__name__", None) or spec.kernel.fn.__name__
    res = AotResult(
        op=spec.op,
        kernel=name,
        label=spec.label,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        expect_hgmma=spec.expect_hgmma,
        hot=spec.hot,
    )
    try:
        t0 = time.perf_counter()
        compiled = triton_compile(spec)
        res.compile_s = round(time.perf_counter() - t0, 3)
        check_ptx_version(compiled.asm["ptx"], _toolchain_once())
        info = cached_inspection(compiled.asm["cubin"], compiled.asm["ptx"])
        res.registers = info["registers"]
        res.local_bytes = info["local_bytes"]
        res.stack_bytes = info["stack_bytes"]
        res.shared_bytes = max(int(compiled.metadata.shared), info["static_shared"])
        res.cta_warps = int(getattr(compiled.metadata, "num_warps", spec.num_warps))
        res.hgmma = info["hgmma"]
        res.spill_bytes = info["spill_bytes"]
        apply_model(res, info["sass"], spec, gpu)
    except Exception as exc:  # report, do not stop the other kernels; the whole compiler message is kept
        text = str(exc).strip()
        res.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        res.error_detail = f"{type(exc).__name__}: {text[-6000:]}"
    res.problems = _problems(res)
    return res


def _problems(r: AotResult) -> list[str]:
    if r.error:
        return [f"does not compile: {r.error}"]
    out = []
    if r.hot and r.spill_bytes:
        out.append(f"spills: {r.spill_bytes} B of spill stores + loads")
    if r.expect_hgmma and not r.hgmma:
        out.append("no HGMMA instruction (Hopper wgmma) in a matrix kernel")
    return out


def collect_specs(ops: list[str] | None = None) -> list[AotSpec]:
    """Every registered spec (the calibration anchors first), or those of `ops` plus the anchors;
    ValueError naming the known ops when one of `ops` has no kernel."""
    import lavin_fast.perf.anchors  # noqa: F401  (registers the calibration anchors)

    load_all_op_modules()
    specs = registered_specs()
    specs.sort(key=lambda s: s.op != ANCHOR_OP)  # stable: anchors first, the rest in order
    if ops:
        check_ops(ops, {s.op for s in specs})
        specs = [s for s in specs if s.op in ops or s.op == ANCHOR_OP]
    return specs


def check_ops(ops: list[str], known: set[str]) -> None:
    """ValueError naming the unknown ones of `ops` and the known ops."""
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"unknown op {', '.join(map(repr, unknown))}; known ops: {', '.join(sorted(known))}")


def _estimate_text(r: dict) -> str:
    for unit, name in (("tflops", "TFLOP/s"), ("gbps", "GB/s")):
        if r.get(f"measured_{unit}") is not None and r.get(f"est_{unit}") is not None:
            err = "" if r.get("measured_error") is None else f", model {r['measured_error']:+.0%}"
            return f"{r[f'est_{unit}']:.0f} {name} (measured {r[f'measured_{unit}']:.0f}{err})"
    band = ""
    if r.get("est_low") is not None:
        band = f" [{r['est_low']:.0f}-{r['est_high']:.0f}{', extrapolated' if r.get('extrapolated') else ''}]"
    if r.get("est_tflops") is not None:
        return f"{r['est_tflops']:.0f} TFLOP/s{band}"
    if r.get("est_gbps") is not None:
        per_elem = f" ({r['bytes_per_elem']:g} B/elem)" if r.get("bytes_per_elem") is not None else ""
        return f"{r['est_gbps']:.0f} GB/s{band}{per_elem}"
    return "-"


def format_table(results: list[dict]) -> str:
    """The kernels' table (the anchors' summary rows are printed apart: calibration.format_anchor_table)."""
    results = [r for r in results if not r.get("anchor")]
    head = ["op", "kernel", "config", "warps", "stages", "regs", "spill B", "smem B", "CTA/SM (limit)", "HGMMA/it",
            "waits/it", "non-MMA/it", "MUFU/it", "load", "estimate", "bound", "status"]  # fmt: skip
    rows = []
    for r in results:

        def val(key, r=r):
            return "-" if r.get(key) is None else str(r[key])

        shapes = r.get("hgmma_shapes") or {}
        hg = "-" if r.get("hgmma_per_iter") is None else str(r["hgmma_per_iter"])
        if shapes:
            hg += " (" + ", ".join(f"{v}x{k}" for k, v in sorted(shapes.items())) + ")"
        occ = "-" if r.get("ctas_per_sm") is None else f"{r['ctas_per_sm']} ({r['occupancy_limit']})"
        waits = val("waits_per_iter")
        if r.get("waits_per_iter"):
            waits += f" ({r['full_waits_per_iter']} full)"
        rows.append(
            [
                r["op"],
                r["kernel"],
                r["label"],
                str(r["num_warps"]),
                str(r["num_stages"]),
                val("registers"),
                val("spill_bytes"),
                val("shared_bytes"),
                occ,
                hg,
                waits,
                val("non_mma_per_iter"),
                val("mufu_per_iter"),
                val("load_kind"),
                _estimate_text(r),
                val("est_bound"),
                "ok" if not r["problems"] else "; ".join(r["problems"]),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)
