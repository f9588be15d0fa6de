"""The whole static report: every registered Triton kernel compiled for sm_90 and modelled (aot.py,
sass_model.py), the calibration anchors' published figures beside their estimates (perf_anchors.py), and the
CUDA C++ kernels analysed from their nvcc cubin (csrc_report.py). It sits above those modules, which do not
import it: `lavin-fast kernels --report` calls `report()`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

from lavin_fast.ops._triton import interpreter_active, triton_import_error
from lavin_fast.perf import csrc_report
from lavin_fast.perf.anchors import published
from lavin_fast.perf.aot import ANCHOR_OP, AotResult, _problems, check_toolchain, collect_specs, compile_spec
from lavin_fast.perf.sass_model import DEFAULT_GPU, GPUS


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
    check_toolchain()  # a Triton whose PTX the ptxas in use cannot read fails here, naming both versions
    results = []
    specs = collect_specs(ops)
    for i, spec in enumerate(specs):
        r = compile_spec(spec, gpu)
        if progress:
            status = "ok" if not r.problems else "; ".join(r.problems)
            print(f"[{i + 1}/{len(specs)}] {r.op}/{r.kernel} {r.label}: {status}", file=sys.stderr, flush=True)
            if r.error_detail:
                print(r.error_detail, file=sys.stderr, flush=True)
        if spec.op == ANCHOR_OP and r.est_tflops:
            pub = published(r.label)
            if pub:
                r.published_tflops = pub[1]
                r.est_error = round(r.est_tflops / pub[1] - 1, 3)
        results.append(asdict(r))
    results += _csrc_results(ops, gpu, progress)
    return results


CSRC_OPS = ("rms_norm_modulate", "gated_rms_norm_residual")  # ops with CUDA C++ kernels in csrc/


def _csrc_results(ops: list[str] | None, gpu: str, progress: bool) -> list[dict]:
    """The CUDA C++ kernels' rows (perf/csrc_report.py), when `ops` asks for them and nvcc is found."""
    if ops and not any(o in CSRC_OPS for o in ops):
        return []
    try:
        rows = csrc_report.report(gpu)
    except Exception as exc:  # nvcc found but failing: a row that fails --check
        err = f"{type(exc).__name__}: {str(exc).strip()[-500:]}"
        r = AotResult(op=CSRC_OPS[0], kernel="cuda csrc/sandwich_norm.cu", label="nvcc sm_90", num_warps=0,
                      num_stages=0, error=err)  # fmt: skip
        r.problems = _problems(r)
        rows = [asdict(r)]
    if not rows and progress:
        print("note: CUDA C++ kernels not analysed (nvcc or csrc/ not found)", file=sys.stderr)
    rows = [r for r in rows if not ops or r["op"] in ops]
    if progress:
        for r in rows:
            status = "ok" if not r["problems"] else "; ".join(r["problems"])
            print(f"[csrc] {r['op']}/{r['kernel']} {r['label']}: {status}", file=sys.stderr, flush=True)
    return rows
