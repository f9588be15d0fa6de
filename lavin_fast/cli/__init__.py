"""The `lavin-fast` command line: one module per subcommand (configure(parser), run(args) -> int), routed by
main.py. The library packages hold no argparse code; subcommand modules are imported only when their command runs."""

from lavin_fast.cli.main import COMMANDS, build_parser, main, package_logging, parse_args

__all__ = ["COMMANDS", "build_parser", "main", "package_logging", "parse_args"]
