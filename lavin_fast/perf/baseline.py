"""The committed static-model baseline (lavin_fast/perf/static_baseline.json, shipped inside the package so that
`kernels --check` finds it in an installed wheel) and the regression check.

A kernel's estimate (est_tflops or est_gbps) may not drop more than TOLERANCE below the baseline's;
a change that moves a figure rewrites the baseline (`kernels --report --update-baseline`) in the
same commit, with the reason in the commit message.
"""

from __future__ import annotations

import json
import pathlib
import re

TOLERANCE = 0.05
BASELINE_VERSION = 1
DEFAULT_BASELINE = pathlib.Path(__file__).resolve().parent / "static_baseline.json"
_FIELDS = ("est_tflops", "est_gbps", "est_low", "est_high", "extrapolated", "est_bound", "ctas_per_sm", "occupancy_limit", "hgmma_per_iter",
           "mma_flops_per_iter", "waits_per_iter", "non_mma_per_iter", "mufu_per_iter", "load_kind",
           "registers", "shared_bytes")  # fmt: skip


def result_key(r: dict) -> str:
    return f"{r['op']}/{r['kernel']}/{r['label']}"


def make_baseline(results: list[dict], gpu: str) -> dict:
    """The baseline document of a report (compiled kernels only)."""
    kernels = {result_key(r): {f: r.get(f) for f in _FIELDS} for r in results
               if not r.get("error") and not r.get("anchor")}  # fmt: skip
    return {"version": BASELINE_VERSION, "gpu": gpu, "tolerance": TOLERANCE, "kernels": kernels}


# the default attention kernels' rows (the 3.4B shape's configuration of each head dim): forward, fused-dQ backward
# the forward's static pick is the row whose label names its tiles and nothing else (other candidates add options)
_ATTN_FWD = re.compile(r"attention/attn_fwd_tma_kernel/fwd hd(\d+) pre-rotated TMA M\d+ N\d+$")
_ATTN_BWD = "attention/attn_bwd_dkdv_tma_kernel/bwd dK/dV hd{hd} pre-rotated TMA +fused dQ"


def attention_rates(path: pathlib.Path | str = DEFAULT_BASELINE) -> tuple[dict[int, float], dict[int, float]]:
    """Estimated useful TFLOP/s of the default attention forward and fused-dQ backward kernels per head dim
    (64, 72, 128), read from the baseline: the planner's figures follow the static model, never a copy of it."""
    rows = load_baseline(path)["kernels"]
    fwd, bwd = {}, {}
    for hd in (64, 72, 128):
        picks = [r for k, r in rows.items() if (m := _ATTN_FWD.match(k)) and m[1] == str(hd)]
        f = picks[0].get("est_tflops") if len(picks) == 1 else None
        b = next((r.get("est_tflops") for k, r in rows.items() if k.startswith(_ATTN_BWD.format(hd=hd))), None)
        if not f or not b:
            raise ValueError(f"{path}: no estimate of the default attention kernels at head dim {hd}")
        fwd[hd], bwd[hd] = float(f), float(b)
    return fwd, bwd


def load_baseline(path: pathlib.Path | str) -> dict:
    """Read a baseline file (JSON only; nothing in it is executed); ValueError if malformed."""
    doc = json.loads(pathlib.Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("kernels"), dict) or "gpu" not in doc:
        raise ValueError(f"{path}: not a static baseline (expected an object with 'gpu' and 'kernels')")
    return doc


def write_baseline(results: list[dict], gpu: str, path: pathlib.Path | str, merge: bool = True) -> dict:
    """Write the baseline of `results`; with merge, entries of kernels not in `results` (a report
    run with --op) are kept from the existing file."""
    doc = make_baseline(results, gpu)
    p = pathlib.Path(path)
    if merge and p.exists():
        old = load_baseline(p)
        if old["gpu"] == gpu:
            doc["kernels"] = {**old["kernels"], **doc["kernels"]}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def _figure(entry: dict) -> tuple[str, float] | None:
    for f in ("est_tflops", "est_gbps"):
        if entry.get(f) is not None:
            return f, float(entry[f])
    return None


def regressions(results: list[dict], baseline: dict, gpu: str, tolerance: float = TOLERANCE) -> list[str]:
    """Kernels whose estimate dropped more than `tolerance` below the baseline (or lost it)."""
    if baseline.get("gpu") != gpu:
        return [f"baseline is for gpu {baseline.get('gpu')!r}, the report for {gpu!r}: rerun with --gpu "
                f"{baseline.get('gpu')}"]  # fmt: skip
    out = []
    for r in results:
        old = baseline["kernels"].get(result_key(r))
        if old is None or r.get("error"):
            continue
        was, now = _figure(old), _figure(r)
        if was is None:
            continue
        if now is None or now[0] != was[0]:
            out.append(f"{result_key(r)}: estimate {was[0]}={was[1]} in the baseline, none now")
        elif now[1] < was[1] * (1 - tolerance):
            out.append(f"{result_key(r)}: {now[0]} {now[1]} < baseline {was[1]} - {tolerance:.0%} "
                       f"({now[1] / was[1] - 1:+.1%})")  # fmt: skip
    return out


def missing_from_baseline(results: list[dict], baseline: dict) -> list[str]:
    return [result_key(r) for r in results
            if result_key(r) not in baseline["kernels"] and not r.get("error") and not r.get("anchor")]  # fmt: skip


def load_measured(path: pathlib.Path | str) -> dict:
    """Measured figures from a GPU run: {"gpu": name, "kernels": {"op/kernel/label": {"tflops": x} or
    {"gbps": y}}} (JSON; ValueError if malformed)."""
    doc = json.loads(pathlib.Path(path).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("kernels"), dict):
        raise ValueError(f"{path}: not a measurement file (expected an object with 'kernels')")
    for key, entry in doc["kernels"].items():
        if not isinstance(entry, dict) or not any(isinstance(entry.get(f), (int, float)) for f in ("tflops", "gbps")):
            raise ValueError(f"{path}: kernels[{key!r}] needs a number 'tflops' or 'gbps', got {entry!r}")
    return doc


def attach_measured(results: list[dict], measured: dict) -> int:
    """Put measured figures next to the estimates (measured_tflops / measured_gbps and the model's
    error, est / measured - 1); returns how many kernels got one."""
    n = 0
    for r in results:
        m = measured["kernels"].get(result_key(r))
        if not m:
            continue
        for unit in ("tflops", "gbps"):
            if m.get(unit) is not None:
                r[f"measured_{unit}"] = float(m[unit])
                est = r.get(f"est_{unit}")
                r["measured_error"] = round(est / float(m[unit]) - 1, 3) if est and m[unit] else None
                n += 1
    return n


def model_error(results: list[dict]) -> dict | None:
    """The model's error over the kernels with a measurement: mean absolute and worst relative error."""
    errs = [r["measured_error"] for r in results if r.get("measured_error") is not None]
    if not errs:
        return None
    return {"kernels": len(errs), "mean_abs": round(sum(map(abs, errs)) / len(errs), 3),
            "worst": max(errs, key=abs)}  # fmt: skip
