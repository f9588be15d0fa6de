"""Ahead-of-time compilation of every registered Triton kernel for Hopper (sm_90), no GPU needed.

Each op module registers a function returning `AotSpec`s (a kernel, its argument types and
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
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lavin_fast.ops._triton import interpreter_active, triton_import_error
from lavin_fast.ops.sass_model import DEFAULT_GPU, GPUS, analyse_sass, estimate, load_kind, occupancy, parse_sass

TARGET_ARCH = 90
WARP_SIZE = 32
ANCHOR_OP = "anchor"  # the calibration kernels of ops/perf_anchors.py


@dataclass
class AotSpec:
    """One kernel in one configuration to compile ahead of time.

    op: the public op this kernel serves.
    kernel: the @triton.jit function.
    signature: argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", ...).
    constexprs: values of the constexpr arguments.
    label: what the configuration stands for (shape, block sizes).
    num_warps / num_stages: launch options, as the autotuner would pick.
    aligned: integer arguments known to be multiples of 16 (pointers are always marked aligned),
        as Triton's launcher specialises them at run time.
    expect_hgmma: a matrix kernel that must use Hopper's wgmma.
    hot: a kernel on a hot path, which must not spill.

    Optional, for the static performance model (ops/sass_model.py); leave at None when unknown:
    programs: the grid size (programs launched) at the problem shape the spec stands for; gives
        the wave quantisation and, with iters_per_program, the time of the whole launch.
    iters_per_program: trip count of the kernel's main (inner) loop per program at that shape.
    useful_flops: the useful FLOPs of the whole launch (e.g. 4*B*H*L*L*hd for attention), so that
        padding (hd 72 computed as 64+16) and masked-off work count as lost time.
    useful_bytes: the bytes a memory-bound launch must move to or from HBM (reads + writes once).
    """

    op: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    label: str = ""
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    expect_hgmma: bool = False
    hot: bool = True
    programs: int | None = None
    iters_per_program: int | None = None
    useful_flops: float | None = None
    useful_bytes: float | None = None


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
    # the static performance model (ops/sass_model.py); per iteration of the main inner loop
    ctas_per_sm: int | None = None
    occupancy_limit: str | None = None
    hgmma_per_iter: int | None = None
    hgmma_shapes: dict[str, int] | None = None  # "64x256x16.SS" -> count per warp
    mma_flops_per_iter: int | None = None  # per CTA (all warpgroups)
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
    est_tflops: float | None = None
    est_gbps: float | None = None
    est_bound: str | None = None
    est_cycles: dict[str, float] | None = None  # the model's terms, cycles per CTA-iteration
    est_gpu: str | None = None
    published_tflops: float | None = None  # anchors: the published figure they are calibrated on
    est_error: float | None = None  # anchors: est_tflops / published - 1
    error: str | None = None
    problems: list[str] = field(default_factory=list)


_SPEC_FACTORIES: list[Callable[[], list[AotSpec]]] = []


def register_aot(factory: Callable[[], list[AotSpec]]) -> Callable[[], list[AotSpec]]:
    """Decorator for a function returning the AotSpecs of an op module (called lazily)."""
    _SPEC_FACTORIES.append(factory)
    return factory


def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found in Triton's package at {path}")
    return path


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def inspect_cubin(cubin: bytes) -> dict[str, Any]:
    """Registers, stack, static shared, local bytes, HGMMA count and SASS of a single-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run(
            [_nvidia_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_nvidia_bin("cuobjdump"), "--dump-sass", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
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
            check=True,
        )
    return sum(int(a) + int(b) for a, b in _SPILL_RE.findall(out.stdout + out.stderr))


def apply_model(res: AotResult, sass: str, spec: AotSpec, gpu: str = DEFAULT_GPU) -> None:
    """Fill `res`'s model fields from the kernel's SASS (res.registers/shared_bytes already set)."""
    funcs = parse_sass(sass)
    insns = max(funcs.values(), key=len) if funcs else []
    a = analyse_sass(insns)
    res.ctas_per_sm, res.occupancy_limit = occupancy(res.registers or 0, res.shared_bytes or 0, res.num_warps)
    res.hgmma_per_iter = a["hgmma"]
    res.hgmma_shapes = a["hgmma_shapes"]
    res.mma_flops_per_iter = a["mma_flops"] * max(res.num_warps // 4, 1)
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
    est = estimate(a, res.num_warps, res.ctas_per_sm, GPUS[gpu], spec.programs, spec.iters_per_program,
                   spec.useful_flops, spec.useful_bytes)  # fmt: skip
    res.est_tflops = None if est.est_tflops is None else round(est.est_tflops, 1)
    res.est_gbps = None if est.est_gbps is None else round(est.est_gbps, 1)
    res.est_bound = est.bound
    res.est_cycles = est.terms
    res.est_gpu = GPUS[gpu].name


def compile_spec(spec: AotSpec, gpu: str = DEFAULT_GPU) -> AotResult:
    """Compile one spec for sm_90 and inspect the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
        arg_names = spec.kernel.arg_names
        attrs = {}
        for i, arg in enumerate(arg_names):
            ty = spec.signature.get(arg)
            if ty is None:
                raise ValueError(f"signature lacks argument {arg!r}")
            if ty.startswith("*") or arg in spec.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        t0 = time.perf_counter()
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", TARGET_ARCH, WARP_SIZE),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        res.compile_s = round(time.perf_counter() - t0, 3)
        info = inspect_cubin(compiled.asm["cubin"])
        res.registers = info["registers"]
        res.local_bytes = info["local_bytes"]
        res.stack_bytes = info["stack_bytes"]
        res.shared_bytes = max(int(compiled.metadata.shared), info["static_shared"])
        res.hgmma = info["hgmma"]
        res.spill_bytes = ptxas_spills(compiled.asm["ptx"])
        apply_model(res, info["sass"], spec, gpu)
    except Exception as exc:  # report, do not stop the other kernels
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
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
    from lavin_fast.ops import load_all_op_modules

    load_all_op_modules()
    specs = [s for factory in _SPEC_FACTORIES for s in factory()]
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


def report(ops: list[str] | None = None, progress: bool = True, gpu: str = DEFAULT_GPU) -> list[dict]:
    """Compile every registered kernel (optionally only those of `ops`, always with the anchors)
    and model it for `gpu` ("h100" or "h200"); list of result dicts, anchors first."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    err = triton_import_error()
    if err:
        raise RuntimeError(err)
    if interpreter_active():
        if ops:  # the names are checked here, the kernels compiled by a child without the interpreter
            collect_specs(ops)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "lavin_fast.cli", "kernels", "--report", "--json", "--gpu", gpu]
        if ops:
            cmd += ["--op", *ops]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"kernels --report failed (rc {out.returncode}): {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout)
    results = []
    specs = collect_specs(ops)
    for i, spec in enumerate(specs):
        r = compile_spec(spec, gpu)
        if progress:
            status = "ok" if not r.problems else "; ".join(r.problems)
            print(f"[{i + 1}/{len(specs)}] {r.op}/{r.kernel} {r.label}: {status}", file=sys.stderr, flush=True)
        if spec.op == ANCHOR_OP and r.est_tflops:
            from lavin_fast.ops.perf_anchors import published

            pub = published(r.label)
            if pub:
                r.published_tflops = pub[1]
                r.est_error = round(r.est_tflops / pub[1] - 1, 3)
        results.append(asdict(r))
    return results


def _estimate_text(r: dict) -> str:
    if r.get("est_tflops") is not None:
        pub = f" (published {r['published_tflops']:.0f}, {r['est_error']:+.0%})" if r.get("published_tflops") else ""
        return f"{r['est_tflops']:.0f} TFLOP/s{pub}"
    if r.get("est_gbps") is not None:
        return f"{r['est_gbps']:.0f} GB/s"
    return "-"


def format_table(results: list[dict]) -> str:
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
