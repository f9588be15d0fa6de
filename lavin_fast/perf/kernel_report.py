"""The whole static report: every registered Triton kernel compiled for sm_90 and modelled (aot.py,
sass_model.py), the calibration anchors' published figures beside their estimates (perf_anchors.py), and the
CUDA C++ kernels analysed from their nvcc cubin (csrc_report.py). It sits above those modules, which do not
import it: `lavin-fast kernels --report` calls `report()`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict

from lavin_fast.ops._triton import interpreter_active, triton_import_error
from lavin_fast.perf import calibration, csrc_report
from lavin_fast.perf.aot import ANCHOR_OP, AotResult, _problems, check_toolchain, collect_specs, compile_spec
from lavin_fast.perf.sass_model import DEFAULT_GPU, GPUS, TENSOR_FLOP_PER_CLK_SM

log = logging.getLogger(__name__)


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
    compiled: dict[str, calibration.Compiled] = {}
    specs = collect_specs(ops)
    for i, spec in enumerate(specs):
        r = compile_spec(spec, gpu)
        if progress:
            status = "ok" if not r.problems else "; ".join(r.problems)
            print(f"[{i + 1}/{len(specs)}] {r.op}/{r.kernel} {r.label}: {status}", file=sys.stderr, flush=True)
            if r.error_detail:
                print(r.error_detail, file=sys.stderr, flush=True)
        if spec.op == ANCHOR_OP:
            if r.error:  # a failing anchor configuration stays in the report, loudly
                results.append(asdict(r))
            elif getattr(r, "analysis", None) is not None:
                compiled[r.label] = calibration.Compiled(r.analysis, r.num_warps, r.ctas_per_sm or 1, r.num_stages)
            continue
        results.append(asdict(r))
    results += _csrc_results(ops, gpu, progress)
    anchors = anchor_rows(compiled)
    add_bands(results, anchors, GPUS[gpu])
    return anchors + results


def anchor_rows(compiled: dict[str, calibration.Compiled]) -> list[dict]:
    """The public anchors' table (published figure, estimate, out-of-sample error), one row per figure."""
    rows, fitted = calibration.leave_one_out(compiled)
    fam = calibration.family_errors(rows)
    stale = {k: (round(getattr(fitted, k), 3), round(getattr(calibration.DEFAULT_PARAMS, k), 3))
             for k in calibration.FREE if abs(getattr(fitted, k) - getattr(calibration.DEFAULT_PARAMS, k)) > 1e-6}  # fmt: skip
    if stale:
        log.warning("the model's constants are not the fit on the anchors (fit, in use): %s; paste the fit into "
                    "perf/sass_model.py", stale)  # fmt: skip
    fitted_anchors = [a for a in calibration.ANCHORS if not a.heldout]
    sens = calibration.sensitivity(fitted_anchors, compiled, fitted)
    past = calibration.past_bound(fitted_anchors, compiled, fitted)
    out = []
    for r in rows:
        r["fit_sensitivity"] = sens  # the same on every row: value, best loss, worst loss, near-best range
        r["past_bound"] = past  # constants at their physical bound that the anchors would take past it
        c = compiled.get(r.get("config", ""))
        if c is not None:
            r["num_warps"], r["ctas_per_sm"], r["num_stages"] = c.num_warps, c.ctas_per_sm, c.num_stages
        est = r.get("est")
        low, high = calibration.band(est, fam[r["family"]]) if est and r["family"] in fam else (None, None)
        out.append({"op": ANCHOR_OP, "kernel": "anchor", "label": r["name"], "anchor": True, **r,
                    "est_low": None if low is None else round(low, 1), "est_high": None if high is None else round(high, 1),
                    "family_error": fam.get(r["family"]), "family_worst": calibration.worst(fam[r["family"]]) if r["family"] in fam else None, "problems": [r["error"]] if r.get("error") else []})  # fmt: skip
    return out


def _family(r: dict) -> str:
    if r.get("mma_flops_per_iter"):
        return "attention" if r.get("mufu_per_iter") else "gemm"
    return "memory"


MIN_FIGURES = 4  # a family with fewer published figures (fitted and held out) is not trusted with its own errors


def add_bands(results: list[dict], anchors: list[dict], gpu=None) -> None:
    """Every row's est_low / est_high from the worst out-of-sample error of its family's anchors (of every family
    when its own has fewer than MIN_FIGURES published figures: two or three figures agreeing say little); a row whose
    structure (warps, CTAs per SM) no validated anchor of its family has, or an attention backward (no backward
    anchor), or a memory-family row the model finds bound by anything but bandwidth (every memory anchor is
    bandwidth-bound), or a warp-specialised kernel (its CTA has more warps than the spec's, in partitions the model does
    not follow), is marked `extrapolated` and gets that band widened (calibration.EXTRAPOLATION); the CUDA C++ rows
    count as memory kernels. `gpu` caps every band at the data sheet."""
    fam_err = {a["family"]: a["family_error"] for a in anchors if a.get("family_error") is not None}
    figures: dict[str, int] = {}
    for a in anchors:
        if a.get("family_error") is not None:
            figures[a["family"]] = figures.get(a["family"], 0) + 1
    if fam_err:  # a family validated on few figures gets the widest errors of all families, not its own
        widest = (min(lo for lo, _ in fam_err.values()), max(hi for _, hi in fam_err.values()))
        fam_err = {f: (tuple(e) if figures[f] >= MIN_FIGURES else widest) for f, e in fam_err.items()}
    shapes: dict[str, set] = {}
    for a in anchors:
        if a.get("num_warps"):
            shapes.setdefault(a["family"], set()).add(_structure(a["family"], a))
    for r in results:
        est = r.get("est_tflops") if r.get("est_tflops") is not None else r.get("est_gbps")
        if est is None:
            continue
        fam = _family(r)
        r["band_family"] = fam
        extrapolated = (
            _structure(fam, r) not in shapes.get(fam, set())
            or (fam == "attention" and "bwd" in r["label"])  # no public backward anchor
            or (fam == "memory" and r.get("est_bound") != "memory")  # memory anchors: bandwidth or round trip
            # warp specialisation: the CTA runs more warps than the spec's, in partitions the model does not follow
            or (r.get("cta_warps") or r.get("num_warps")) != r.get("num_warps")
        )
        r["extrapolated"] = extrapolated
        if fam in fam_err:
            low, high = calibration.band(est, tuple(fam_err[fam]), extrapolated)
            if gpu is not None:  # no band reaches past the data sheet: the dense tensor peak, the HBM bandwidth
                peak = gpu.sms * TENSOR_FLOP_PER_CLK_SM * gpu.clock_ghz / 1e3 if r.get("est_tflops") else gpu.hbm_gbps
                high = min(high, max(peak, est))
            r["est_low"], r["est_high"] = round(low, 1), round(high, 1)


def _structure(family: str, r: dict) -> tuple:
    """What a row must share with an anchor to be inside the validated range: MMA kernels their warps and CTAs per
    SM (8 warps in 2 CTAs is not 4 warps in 4); memory kernels their warps per CTA."""
    return (r.get("num_warps"),) if family == "memory" else (r.get("num_warps"), r.get("ctas_per_sm"))


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
