"""Compile every registered Triton kernel ahead of time for sm_90 (no GPU needed) and report
registers, spills, shared memory, HGMMA count and the static performance model's estimate per
kernel and configuration (see docs/static_report.md)."""

from __future__ import annotations

import argparse
import json
import sys


def configure(p: argparse.ArgumentParser) -> None:
    from lavin_fast.perf.baseline import DEFAULT_BASELINE, TOLERANCE
    from lavin_fast.perf.gpus import DEFAULT_GPU, GPUS

    p.add_argument("--report", action="store_true", help="compile and print the report (the default action)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--op", nargs="+", default=None, help="only the kernels of these ops (the anchors always)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=DEFAULT_GPU, help="the GPU the estimates are for")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 (as without --check) if a kernel fails to compile; also if a hot kernel spills, a matrix kernel lacks HGMMA, or an "
        f"estimate drops more than {round(TOLERANCE * 100)}%% below the baseline",
    )
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="the baseline file for --check")
    p.add_argument(
        "--measured",
        default=None,
        help="JSON of measured figures from a GPU run ({'kernels': {'op/kernel/label': {'tflops'|'gbps': x}}}): "
        "shown next to the estimates with the model's error",
    )
    p.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline with this report's figures (kernels not compiled in this run are kept)",
    )


def run(args: argparse.Namespace) -> int:
    import pathlib

    from lavin_fast.perf.aot import format_table
    from lavin_fast.perf.baseline import (
        attach_measured,
        load_baseline,
        load_measured,
        missing_from_baseline,
        model_error,
        regressions,
        write_baseline,
    )
    from lavin_fast.perf.kernel_report import report

    try:
        measured = load_measured(args.measured) if args.measured else None
        results = report(args.op, progress=not args.json, gpu=args.gpu)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if measured:
        attach_measured(results, measured)
        err = model_error(results)
        print(f"model error against {args.measured}: {err}" if err else "note: no measured kernel matches",
              file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        from lavin_fast.perf.calibration import format_anchor_table

        anchors = [r for r in results if r.get("anchor")]
        if anchors:
            print("Public anchors (published H100 figures; every estimate is a static estimate, not a measurement):")
            print(format_anchor_table(anchors))
            print()
        if any(not r.get("anchor") for r in results):
            print(format_table(results))
    # a kernel that does not compile fails the report (with or without --check), its compiler error printed
    failed = [r for r in results if r.get("error")]
    for r in failed:
        print(f"FAIL {r['op']}/{r['kernel']} {r['label']} does not compile:\n{r.get('error_detail') or r['error']}",
              file=sys.stderr)  # fmt: skip
    rc = 1 if failed else 0
    if args.check:
        bad = [r for r in results if r["problems"] and not r.get("error")]  # compile errors: printed above
        for r in bad:
            print(f"FAIL {r['op']}/{r['kernel']} {r['label']}: {'; '.join(r['problems'])}", file=sys.stderr)
        if not results:
            print("FAIL: no kernel is registered", file=sys.stderr)
        baseline_path = pathlib.Path(args.baseline)
        if not baseline_path.exists():
            print(f"note: no baseline at {baseline_path}; estimates not compared", file=sys.stderr)
            drops = []
        else:
            baseline = load_baseline(baseline_path)
            drops = regressions(results, baseline, args.gpu)
            for line in drops:
                print(f"FAIL estimate: {line}", file=sys.stderr)
            for key in missing_from_baseline(results, baseline):
                print(f"note: {key} is not in the baseline (add it with --update-baseline)", file=sys.stderr)
        if failed or bad or drops or not results:
            rc = 1
    if args.update_baseline:
        write_baseline(results, args.gpu, args.baseline)
        print(f"baseline written: {args.baseline}", file=sys.stderr)
    return rc
