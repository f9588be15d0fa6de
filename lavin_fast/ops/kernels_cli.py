"""Compile every registered Triton kernel ahead of time for sm_90 (no GPU needed) and report
registers, spills (local memory), shared memory and HGMMA count per kernel and configuration."""

from __future__ import annotations

import argparse
import json
import sys


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", action="store_true", help="compile and print the report (the default action)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--op", nargs="+", default=None, help="only the kernels of these ops")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a kernel fails to compile, a hot kernel spills, or a matrix kernel lacks HGMMA",
    )


def run(args: argparse.Namespace) -> int:
    from lavin_fast.ops.aot import format_table, report

    results = report(args.op, progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
    bad = [r for r in results if r["problems"]]
    if args.check and (bad or not results):
        for r in bad:
            print(f"FAIL {r['op']}/{r['kernel']} {r['label']}: {'; '.join(r['problems'])}", file=sys.stderr)
        if not results:
            print("FAIL: no kernel is registered", file=sys.stderr)
        return 1
    return 0
