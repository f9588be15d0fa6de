"""The `lavin-fast` command. Each subcommand lives in its own module with `configure(parser)`, `run(args) -> int`
and optionally `upgrade_argv(argv) -> argv` (old spellings of its command line); this file only routes, so modules
load when their command runs, and configures `logging` for the whole package while a command runs."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator

from lavin_fast.cli.args import Parser

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("lavin_fast.cli.info", "versions, devices, and which kernel backends are usable (and why not)"),
    "kernels": ("lavin_fast.cli.kernels", "ahead-of-time sm_90 compile report of every Triton kernel"),
    "demo": ("lavin_fast.cli.demo", "train a tiny model on the embedded demo data, then sample (the README's job)"),
    "train": ("lavin_fast.cli.train", "flow-matching training from a YAML config (torchrun for many GPUs)"),
    "sample": ("lavin_fast.cli.sample", "in-context sampling: task folder of example pairs + query -> PNG"),
    "eval": ("lavin_fast.cli.eval", "the paper's metrics on a folder of predictions (score, make-set)"),
    "data": ("lavin_fast.cli.data", "data pipeline tools (demo, check, bench, build-cache)"),
    "plan": ("lavin_fast.cli.plan", "estimate mesh, memory per GPU, step time and MFU of a training run"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:  # the command's module is not part of this build
            return None
        raise


def _add_log_flags(parser: argparse.ArgumentParser, default) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--quiet", dest="log_level", action="store_const", const=logging.WARNING, default=default,
                   help="log warnings and errors only")  # fmt: skip
    g.add_argument("--verbose", dest="log_level", action="store_const", const=logging.DEBUG, default=default,
                   help="log debug messages too, with the logger's name")  # fmt: skip
    parser.add_argument("--debug", action="store_true", default=False if default is not argparse.SUPPRESS else default,
                        help="on an error, show the full traceback (default: one line)")  # fmt: skip


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield sub
                yield from _subparsers(sub)


def build_parser(only: str | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The `lavin-fast` parser. Only the command `only` (every command with `full=True`) imports its module and
    adds its arguments; the others are listed by name and one-line help, so `lavin-fast --help` imports no
    subcommand module (no torch, no optional package) and one command's `--help` imports that command alone."""
    parser = Parser(prog="lavin-fast", description="LaVin-DiT, fast: kernels, training, sampling.")
    _add_log_flags(parser, logging.INFO)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not full and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = _load(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    # --quiet / --verbose also after the (sub)command; SUPPRESS keeps a value given before it
    for p in _subparsers(parser):
        if "--quiet" not in p._option_string_actions:
            _add_log_flags(p, argparse.SUPPRESS)
    return parser


class _Format(logging.Formatter):
    """Plain lines: info as the message itself, other levels prefixed; --verbose adds time and logger name."""

    def __init__(self, verbose: bool):
        super().__init__("%(asctime)s %(name)s %(levelname)s: %(message)s" if verbose else None, "%H:%M:%S")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        text = super().format(record)  # the message, with any traceback
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


@contextlib.contextmanager
def package_logging(level: int) -> Iterator[None]:
    """Log the `lavin_fast` package's records at `level` and above to stderr while the command runs; the logger's
    previous level and handlers come back afterwards (in-process callers, tests)."""
    logger = logging.getLogger("lavin_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(verbose=level <= logging.DEBUG))
    before = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line -> its namespace (old spellings upgraded, with notes); exits 2 on a bad command line."""
    argv = list(argv)
    # configure only the command being run, so one command does not import the others
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    only = argv[at] if at is not None and argv[at] in COMMANDS else None
    with package_logging(logging.INFO):  # the deprecation notes are warnings
        if only is not None:
            upgrade = getattr(_load(COMMANDS[only][0]), "upgrade_argv", None)
            if upgrade is not None:
                argv = argv[: at + 1] + upgrade(argv[at + 1 :])
        return build_parser(only).parse_args(argv)


def error_line(exc: BaseException) -> str:
    """The one line an error becomes. The package's own errors (and the OS's, and bad values) speak for themselves;
    anything else keeps its type name, since its message alone may be a bare key or number."""
    failures = getattr(exc, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        causes = "; ".join(f"rank {r}: {type(e[0] if isinstance(e, tuple) else e).__name__}: "
                           f"{e[0] if isinstance(e, tuple) else e}" for r, e in sorted(failures.items())[:4])  # fmt: skip
        return f"checkpoint I/O failed ({type(exc).__name__}) on {causes}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory ({text}); lower the sizes, or see --max-memory"
    if isinstance(exc, KeyError):
        return f"missing entry {text} (KeyError): the file or config lacks it"
    if isinstance(exc, (ValueError, OSError)) or type(exc).__module__.split(".")[0] == "lavin_fast":
        return text
    return f"{type(exc).__name__}: {text} (an unexpected error; --debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure ends as one line `lavin-fast CMD: error: ...` on stderr and exit code 2
    (`--debug`: the traceback instead); DCP's CheckpointException, a BaseException, included."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not getattr(args, "_run", None):
        build_parser().print_help()
        return 0 if not argv else 2
    with package_logging(args.log_level):
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt:
            print(f"lavin-fast {args.command}: interrupted", file=sys.stderr)
            return 130
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: BLE001 (the CLI's one place that turns any failure into a line)
            if getattr(args, "debug", False):
                raise
            print(f"lavin-fast {args.command}: error: {error_line(exc)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
