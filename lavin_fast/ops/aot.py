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

TARGET_ARCH = 90
WARP_SIZE = 32


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


def inspect_cubin(cubin: bytes) -> dict[str, int]:
    """Registers, stack, static shared, local bytes and HGMMA count of a single-kernel cubin."""
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


def compile_spec(spec: AotSpec) -> AotResult:
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
    from lavin_fast.ops import load_all_op_modules

    load_all_op_modules()
    specs = [s for factory in _SPEC_FACTORIES for s in factory()]
    if ops:
        specs = [s for s in specs if s.op in ops]
    return specs


def report(ops: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Compile every registered kernel (optionally only those of `ops`); list of result dicts."""
    err = triton_import_error()
    if err:
        raise RuntimeError(err)
    if interpreter_active():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "lavin_fast.cli", "kernels", "--report", "--json"]
        if ops:
            cmd += ["--op", *ops]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out)
    results = []
    specs = collect_specs(ops)
    for i, spec in enumerate(specs):
        r = compile_spec(spec)
        if progress:
            status = "ok" if not r.problems else "; ".join(r.problems)
            print(f"[{i + 1}/{len(specs)}] {r.op}/{r.kernel} {r.label}: {status}", file=sys.stderr, flush=True)
        results.append(asdict(r))
    return results


def format_table(results: list[dict]) -> str:
    head = ["op", "kernel", "config", "warps", "stages", "regs", "spill B", "local B", "smem B", "HGMMA", "status"]
    rows = []
    for r in results:
        rows.append(
            [
                r["op"],
                r["kernel"],
                r["label"],
                str(r["num_warps"]),
                str(r["num_stages"]),
                "-" if r["registers"] is None else str(r["registers"]),
                "-" if r["spill_bytes"] is None else str(r["spill_bytes"]),
                "-" if r["local_bytes"] is None else str(r["local_bytes"] + (r["stack_bytes"] or 0)),
                "-" if r["shared_bytes"] is None else str(r["shared_bytes"]),
                "-" if r["hgmma"] is None else str(r["hgmma"]),
                "ok" if not r["problems"] else "; ".join(r["problems"]),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)
