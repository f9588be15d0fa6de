"""One vocabulary for every `lavin-fast` command: the parser, `--device`, and the deprecated spellings.

- `Parser`: an unknown flag gets the usage of the (sub)command it was given to and the closest known flag
  ("did you mean --steps?"); a bad choice (command, subcommand, option value) gets the closest choice.
- `add_device`: `--device auto|cpu|cuda` (also cuda:N); the old value "gpu" reads as cuda, with a note.
- `add_deprecated_alias`: an old flag spelling (snake_case, --n-pairs, ...) kept as a hidden alias of the
  new one for one release; using it logs a warning naming the new spelling.
- `upgrade_mode_flags`: the old mode flags (`data --check SOURCE`, `eval --make-set TASK`) rewritten to
  the subcommands that replace them, with the same note.
- `BOUNDS` / `Bounded` (from lavin_fast/bounds.py): the one schema of numeric arguments. Every numeric flag of
  every command takes its type from it, so an out-of-range value stops the parser (rc 2) with the flag and the
  range, before anything is read or allocated; the training config's fields are checked against `CONFIG_BOUNDS`
  by the config's own validation.

It imports only lavin_fast.bounds (a base module), so a command module at any layer can use it.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
from collections.abc import Sequence

from lavin_fast.bounds import BOUNDS, CONFIG_BOUNDS, Bounded, check_config_bounds

__all__ = ["BOUNDS", "CONFIG_BOUNDS", "Bounded", "Parser", "add_deprecated_alias", "add_device", "check_config_bounds",
           "deprecation_note", "device_arg", "upgrade_mode_flags"]  # fmt: skip

DEVICES = ("auto", "cpu", "cuda")
_log = logging.getLogger(__name__)


def deprecation_note(old: str, new: str) -> None:
    """The one wording of every deprecated spelling: a warning on the package's logger (stderr under the CLI)."""
    _log.warning("'%s' is deprecated, use '%s' (the old spelling goes in the next release)", old, new)


def _flag_suggestions(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every long flag -> the spelling to suggest for it (a deprecated alias suggests its new spelling)."""
    out = {}
    for flag, action in parser._option_string_actions.items():
        if flag.startswith("--"):
            out[flag] = action.new if isinstance(action, _DeprecatedAlias) else flag
    return out


def _closest(word: str, candidates: Sequence[str]) -> str | None:
    by_key = {c.replace("_", "-").lower(): c for c in candidates}
    found = difflib.get_close_matches(word.replace("_", "-").lower(), list(by_key), n=1, cutoff=0.6)
    return by_key[found[0]] if found else None


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
        return False  # a negative number is a value
    except ValueError:
        return True


def unknown_arguments_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """'unrecognized arguments: --stepz 3 (--stepz: did you mean --steps?)'."""
    hints = []
    suggestions = _flag_suggestions(parser)
    for token in extras:
        if _looks_like_flag(token):
            flag = token.split("=", 1)[0]
            close = _closest(flag, list(suggestions))
            if close:
                hints.append(f"{flag}: did you mean {suggestions[close]}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return message + (f" ({'; '.join(hints)})" if hints else "")


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors name the parser that was reached and suggest the closest spelling.

    Subparsers made with `add_subparsers()` are of this class too (argparse uses the parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a subparser's defaults overwrite its parent's: after parsing, the deepest parser reached
        self.set_defaults(_cli_parser=self)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = getattr(ns, "_cli_parser", self)
            owner.error(unknown_arguments_message(owner, extras))
        vars(ns).pop("_cli_parser", None)
        return ns

    def error(self, message: str):
        # "argument COMMAND: invalid choice: 'trian' (choose from 'info', 'train', ...)"
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = _closest(m.group(1), choices)
            if close:
                message += f"; did you mean {close!r}?"
        super().error(message)


def device_arg(value: str) -> str:
    """The `--device` type: auto, cpu, cuda or cuda:N; the old "gpu" reads as "cuda" (with a note)."""
    v = value.strip().lower()
    if v == "gpu":
        deprecation_note("--device gpu", "--device cuda")
        return "cuda"
    if v in DEVICES or re.fullmatch(r"cuda:\d+", v):
        return v
    raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda (or cuda:N), got {value!r}")


def add_device(parser, default: str | None = "auto", help: str = "auto (CUDA when present), cpu or cuda") -> None:
    parser.add_argument("--device", type=device_arg, default=default, metavar="{auto,cpu,cuda}", help=help)


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of another option: notes the new spelling, then acts as that option."""

    def __init__(self, option_strings, dest, target: argparse.Action, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.target, self.new = target, new

    def __call__(self, parser, namespace, values, option_string=None):
        deprecation_note(option_string or self.option_strings[0], self.new)
        self.target(parser, namespace, values, self.new)


def add_deprecated_alias(parser, old: str, new: str) -> None:
    """Accept `old` as a hidden spelling of the option `new` (already added to `parser` or its group)."""
    target = parser._option_string_actions[new]
    parser.add_argument(
        old,
        action=_DeprecatedAlias,
        target=target,
        new=new,
        dest=target.dest,
        nargs=target.nargs,
        const=target.const,
        type=target.type,
        choices=target.choices,
        metavar=target.metavar,
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )


# options that may come before a subcommand (they do not select a mode)
_PASSTHROUGH = ("-h", "--help", "--quiet", "--verbose")


def upgrade_mode_flags(
    command: str,
    argv: list[str],
    subcommands: Sequence[str],
    modes: dict[str, tuple[str, bool]],
    default: str | None = None,
) -> list[str]:
    """Rewrite an old mode-flag command line to the subcommand form, with a deprecation note.

    `modes` maps an old flag to (subcommand, whether the flag took a value, which becomes the
    subcommand's first positional): {"--check": ("check", True)} turns `--check demo --seed 1`
    into `check demo --seed 1`. With no mode flag and no subcommand, `default` (if given) is put
    in front (`eval TASK ...` -> `eval score TASK ...`). A command line already naming a
    subcommand is returned unchanged."""
    first = next((a for a in argv if a not in _PASSTHROUGH), None)
    if first is None or first in subcommands:
        return argv
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag not in modes:
            continue
        sub, takes_value = modes[flag]
        rest, head, old = argv[:i] + argv[i + 1 :], [sub], [flag]
        if takes_value and eq:
            head.append(value)
            old.append(value)
        elif takes_value and i + 1 < len(argv):
            head.append(argv[i + 1])
            old.append(argv[i + 1])
            rest = argv[:i] + argv[i + 2 :]
        deprecation_note(f"lavin-fast {command} {' '.join(old)}", f"lavin-fast {command} {' '.join(head)}")
        return head + rest
    if default is not None:
        deprecation_note(f"lavin-fast {command} {first} ...", f"lavin-fast {command} {default} {first} ...")
        return [default, *argv]
    return argv
