"""The `lavin-fast` command. Each subcommand lives in its own module with `configure(parser)`
and `run(args) -> int`; this file only routes, so modules load when their command runs."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("lavin_fast.info", "versions, devices, and which kernel backends are usable (and why not)"),
    "kernels": ("lavin_fast.ops.kernels_cli", "ahead-of-time sm_90 compile report of every Triton kernel"),
    "demo": ("lavin_fast.demo", "train a tiny model on the embedded demo data, then sample (the README's job)"),
    "train": ("lavin_fast.train.cli", "flow-matching training from a YAML config (torchrun for many GPUs)"),
    "sample": ("lavin_fast.flow.cli", "in-context sampling: task folder of example pairs + query -> PNG"),
    "eval": ("lavin_fast.eval.cli", "the paper's metrics on a folder of predictions"),
    "data": ("lavin_fast.data.cli", "data pipeline tools (--bench: DALI against a PIL DataLoader)"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the command's module is not part of this build
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavin-fast", description="LaVin-DiT, fast: kernels, training, sampling.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # configure only the command being run, so one command does not import the others
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
