"""Fit the static model's constants on the public anchors (perf/anchors.py) and validate them out of sample.

Each anchor is a published figure; its estimate is the best over the configurations its authors autotuned (each
compiled once for sm_90, its SASS analysed once; only the shape terms differ between anchors). `fit` picks the
free constants of sass_model.Params by coordinate descent on the sum of squared log errors; `leave_one_out` refits
without each anchor in turn and estimates it with the constants fitted on the others: that out-of-sample error,
per anchor and its worst per family, is the error the report states and the band every row gets.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from lavin_fast.perf.anchors import ANCHORS, ROW_KERNELS, Anchor, anchor_configs, published_rate
from lavin_fast.perf.sass_model import DEFAULT_PARAMS, GPUS, Params, estimate

log = logging.getLogger(__name__)

# the constants fitted, and the grid each is searched on
FREE = {
    "tensor_efficiency": [0.50 + 0.02 * i for i in range(26)],
    "issue_efficiency": [0.4 + 0.05 * i for i in range(13)],
    "warp_ipc": [0.15 + 0.025 * i for i in range(19)],
    "launch_us": [0.25 * i for i in range(25)],
    "hbm_efficiency": [0.60 + 0.025 * i for i in range(15)],
    # the stalls the SASS shows (per full wgmma wait, per BAR.SYNC, per softmax iteration): fitted like the rest;
    # `sensitivity` shows how little the anchors pin them down
    "wait_clk": [16.0 * i for i in range(17)],
    "bar_clk": [8.0 * i for i in range(13)],
    "chain_clk": [40.0 * i for i in range(11)],
    "mem_latency_clk": [400.0 + 200.0 * i for i in range(14)],
    # how limits that bind together add (sass_model.combine: the p-norm; 64 is max() within 1.1%)
    "limit_p": [4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0, 64.0],
}
SWEEPS = 8


@dataclass
class Compiled:
    """One compiled anchor configuration: the SASS analysis and the launch options the model reads."""

    analysis: dict
    num_warps: int
    ctas_per_sm: int
    num_stages: int


def anchor_estimate(anchor: Anchor, compiled: dict[str, Compiled], params: Params) -> tuple[float | None, str]:
    """(the best configuration's estimate in the anchor's unit, that configuration's label); None when none of its
    configurations compiled."""
    best, best_label = None, ""
    for label, terms in anchor_configs(anchor):
        c = compiled.get(label)
        if c is None:
            continue
        e = estimate(c.analysis, c.num_warps, c.ctas_per_sm, GPUS[anchor.gpu], num_stages=c.num_stages,
                     params=params, **terms)  # fmt: skip
        rate = e.est_tflops if e.est_tflops is not None else e.est_gbps
        if rate is not None and (best is None or rate > best):
            best, best_label = rate, label
    return best, best_label


def _loss(anchors: list[Anchor], compiled: dict[str, Compiled], params: Params) -> float:
    """Squared log error, each figure weighted by 1 / (the figures of its source in `anchors`): every source (one
    benchmark run: a paper's figure, a commit's table) weighs the same, however many sizes it lists."""
    per_source: dict[str, int] = {}
    for a in anchors:
        per_source[a.source] = per_source.get(a.source, 0) + 1
    total = 0.0
    for a in anchors:
        est, _ = anchor_estimate(a, compiled, params)
        if est:
            total += math.log(est / published_rate(a)) ** 2 / per_source[a.source]
    return total


def fit(anchors: list[Anchor], compiled: dict[str, Compiled], start: Params = DEFAULT_PARAMS) -> Params:
    """The constants of FREE that minimise the squared log error over `anchors` (coordinate descent on grids)."""
    params = start
    best = _loss(anchors, compiled, params)
    for _ in range(SWEEPS):
        moved = False
        for name, grid in FREE.items():
            for v in grid:
                trial = replace(params, **{name: v})
                loss = _loss(anchors, compiled, trial)
                if loss < best - 1e-12:
                    best, params, moved = loss, trial, True
        if not moved:
            break
    return params


def sensitivity(anchors: list[Anchor], compiled: dict[str, Compiled], params: Params) -> dict[str, tuple]:
    """For each fitted constant: (its value, the loss at it, the largest loss over its grid with the others held,
    the grid values whose loss is within 1% of the best). A constant whose loss barely moves over its grid is
    not pinned down by the anchors (the fit is flat in it)."""
    out = {}
    for name, grid in FREE.items():
        losses = [(v, _loss(anchors, compiled, replace(params, **{name: v}))) for v in grid]
        best = min(loss for _, loss in losses)
        near = [v for v, loss in losses if loss <= best * 1.01 + 1e-12]
        out[name] = (getattr(params, name), round(best, 5), round(max(loss for _, loss in losses), 5),
                     (min(near), max(near)))  # fmt: skip
    return out


# fractions of a data-sheet rate: a fit that would take more than 1.0 says some other term over-charges those anchors
PHYSICAL_MAX = {"tensor_efficiency": 1.0, "issue_efficiency": 1.0, "hbm_efficiency": 1.0}
PAST_BOUND = (1.05, 1.1, 1.2, 1.3)


def past_bound(anchors: list[Anchor], compiled: dict[str, Compiled], params: Params) -> dict[str, tuple]:
    """The constants that are fractions of a data-sheet rate (PHYSICAL_MAX) whose loss, the others held at `params`,
    is lower past 1.0 than at their fitted value: {name: (the best value past the bound, its loss, the loss at the
    fit)}. The grid stops at the physical bound, so such a constant sits at its top and the anchors want more than
    the machine gives: a term the constant multiplies is not what binds them, some other term over-charges them."""
    at_fit = _loss(anchors, compiled, params)
    out = {}
    for name, bound in PHYSICAL_MAX.items():
        trials = [(bound * f, _loss(anchors, compiled, replace(params, **{name: bound * f}))) for f in PAST_BOUND]
        value, loss = min(trials, key=lambda t: t[1])
        if loss < at_fit - 1e-9:
            out[name] = (round(value, 3), round(loss, 5), round(at_fit, 5))
    return out


def leave_one_out(compiled: dict[str, Compiled], anchors: tuple[Anchor, ...] = ANCHORS,
                  start: Params = DEFAULT_PARAMS) -> tuple[list[dict], Params]:  # fmt: skip
    """(one row per anchor, the constants fitted on all anchors but the held-out ones). A row: published, the
    estimate with constants fitted on all fitted anchors (in-sample) and with constants fitted on the others (out of
    sample), and both errors (estimate / published - 1). A held-out anchor is never fitted on: its estimate (both
    columns) uses the constants fitted on all the others, and its row says `heldout`."""
    usable = [a for a in anchors if anchor_estimate(a, compiled, start)[0] is not None]
    fitted = [a for a in usable if not a.heldout]
    full = fit(fitted, compiled, start)
    rows = []
    for a in anchors:
        pub = published_rate(a)
        row = {"name": a.name, "family": a.family, "gpu": GPUS[a.gpu].name, "source": a.source,
               "published": round(pub, 1), "unit": "GB/s" if a.kernel in ROW_KERNELS else "TFLOP/s",
               "published_us": a.published if a.kernel in ROW_KERNELS else None, "heldout": a.heldout}  # fmt: skip
        if a not in usable:
            rows.append({**row, "error": "no configuration compiled"})
            continue
        est_in, cfg = anchor_estimate(a, compiled, full)
        others = full if a.heldout else fit([b for b in fitted if b is not a], compiled, full)
        est_out, _ = anchor_estimate(a, compiled, others)
        rows.append({**row, "config": cfg, "est_in_sample": round(est_in, 1), "in_sample_error": round(est_in / pub - 1, 3),
                     "est": round(est_out, 1), "oos_error": round(est_out / pub - 1, 3)})  # fmt: skip
    return rows, full


def family_errors(rows: list[dict], which: str = "all") -> dict[str, tuple[float, float]]:
    """(most negative, most positive) out-of-sample error (estimate / published - 1) of each family; 0 bounds a
    side no anchor falls on. `which`: "all" (leave-one-out and held-out: the bands), "fitted" or "heldout"."""
    out: dict[str, tuple[float, float]] = {}
    for r in rows:
        if which != "all" and bool(r.get("heldout")) != (which == "heldout"):
            continue
        e = r.get("oos_error")
        if e is not None:
            lo, hi = out.get(r["family"], (0.0, 0.0))
            out[r["family"]] = (min(lo, e), max(hi, e))
    return out


def worst(errors: tuple[float, float]) -> float:
    return max(abs(errors[0]), abs(errors[1]))


EXTRAPOLATION = 1.5  # an extrapolated row's band: its family's errors widened by this factor (assumed)
MAX_ERROR = 0.6


def band(est: float, errors: tuple[float, float], extrapolated: bool = False) -> tuple[float, float]:
    """(low, high) for a figure whose model was found to rate between errors[0] and errors[1] (estimate / truth - 1)
    on its family's anchors, out of sample: truth = estimate / (1 + error)."""
    f = EXTRAPOLATION if extrapolated else 1.0
    lo, hi = max(errors[0] * f, -MAX_ERROR), min(errors[1] * f, MAX_ERROR)
    return est / (1 + hi), est / (1 + lo)


def format_anchor_table(rows: list[dict]) -> str:
    """The public anchors: published figure, the estimate fitted without it (out of sample) and its band, the
    in-sample estimate, the errors, the configuration the estimate picked and the figure's source."""
    head = ["anchor", "set", "family", "GPU", "published", "estimate (out of sample)", "band", "oos error", "in-sample",
            "best config", "source"]  # fmt: skip
    body = []
    for r in rows:
        unit = r.get("unit", "")
        pub = f"{r['published']:g} {unit}" + (f" ({r['published_us']:g} us)" if r.get("published_us") else "")
        kind = "held out" if r.get("heldout") else "fit"
        if r.get("est") is None:
            body.append([r["label"], kind, r["family"], r.get("gpu", ""), pub, "-", "-", "-", "-", "-",
                         r.get("error", "")])  # fmt: skip
            continue
        body.append([r["label"], kind, r["family"], r["gpu"], pub, f"{r['est']:g}", f"{r['est_low']:g}-{r['est_high']:g}",
                     f"{r['oos_error']:+.1%}", f"{r['est_in_sample']:g} ({r['in_sample_error']:+.1%})", r["config"],
                     r["source"][:60]])  # fmt: skip
    fam = family_errors(rows, "fitted")
    held: dict[str, tuple[float, float]] = {}  # the held-out errors' own range (no 0 bound: few figures each)
    for r in rows:
        if r.get("heldout") and r.get("oos_error") is not None:
            lo, hi = held.get(r["family"], (r["oos_error"], r["oos_error"]))
            held[r["family"]] = (min(lo, r["oos_error"]), max(hi, r["oos_error"]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    lines = [fmt.format(*head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt.format(*b) for b in body)]
    lines.append("out-of-sample error per family (estimate / published - 1, each anchor estimated with constants "
                 "fitted on the others): " + ", ".join(f"{k} {lo:+.1%} to {hi:+.1%}" for k, (lo, hi) in fam.items()))  # fmt: skip
    sens = next((r["fit_sensitivity"] for r in rows if r.get("fit_sensitivity")), None)
    if sens:
        lines.append("fitted constants: value [values within 1% of the best loss] (loss there -> worst loss over the "
                     "grid; a flat one is not pinned down): " + "; ".join(
                         f"{k} {v[0]:g} [{v[3][0]:g}-{v[3][1]:g}] ({v[1]:.3f} -> {v[2]:.3f})" for k, v in sens.items()))  # fmt: skip
    past = next((r["past_bound"] for r in rows if r.get("past_bound")), None)
    if past:
        lines.append("at a physical bound (a fraction of a data-sheet rate), the anchors want more (others held; some "
                     "other term over-charges them): " + "; ".join(
                         f"{k} {v[0]:g} (loss {v[1]:.4f} < {v[2]:.4f} at the fit)" for k, v in past.items()))  # fmt: skip
    if held:
        lines.append("held-out anchors (never fitted on; constants fitted on all the others): "
                     + ", ".join(f"{k} {lo:+.1%} to {hi:+.1%}" for k, (lo, hi) in held.items()))  # fmt: skip
    return "\n".join(lines)
