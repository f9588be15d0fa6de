"""CPU data-loading benchmark: DALI (CPU operators) against PIL in a torch DataLoader with the same
number of workers on the same files, plus the in-context loader and the task builders.

    python -m bench.cpu_data [--seconds 8] [--workers 2] [--resolution 256] [--images DIR] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from lavin_fast.cli.args import add_deprecated_alias
from lavin_fast.cli.data import _print_table, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--num-pairs", type=int, default=4)
    add_deprecated_alias(p, "--n-pairs", "--num-pairs")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)
    args.device = "cpu"
    rows = run_bench(args)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        _print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
