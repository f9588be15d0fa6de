"""One vocabulary for every `lavin-fast` command: the parser, `--device`, and the deprecated spellings.

- `Parser`: an unknown flag gets the usage of the (sub)command it was given to and the closest known flag
  ("did you mean --steps?"); a bad choice (command, subcommand, option value) gets the closest choice.
- `add_device`: `--device auto|cpu|cuda` (also cuda:N); the old value "gpu" reads as cuda, with a note.
- `add_deprecated_alias`: an old flag spelling (snake_case, --n-pairs, ...) kept as a hidden alias of the
  new one for one release; using it logs a warning naming the new spelling.
- `upgrade_mode_flags`: the old mode flags (`data --check SOURCE`, `eval --make-set TASK`) rewritten to
  the subcommands that replace them, with the same note.
- `BOUNDS` / `Bounded`: the one schema of numeric arguments. Every numeric flag of every command (and every numeric
  field of the training config) takes its type from it, so an out-of-range value stops the parser (rc 2) with the
  flag and the range, before anything is read or allocated. `check_config_bounds` applies it to a loaded config.

It imports nothing from the package, so a command module at any layer can use it.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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


# ------------------------------------------------------------------ the schema of numeric arguments
def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Bounded:
    """An argparse type: an int or float within [lo, hi] (None: unbounded on that side; `lo_open`: lo excluded).
    Floats must be finite. The error names the range; argparse adds the flag."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    @property
    def __name__(self) -> str:  # argparse's "invalid <name> value" wording
        return self.kind.__name__

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None and not self.lo_open:
            return f"{what} in [{_num(self.lo)}, {_num(self.hi)}]"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_num(self.lo)}")
        if self.hi is not None:
            parts.append(f"<= {_num(self.hi)}")
        return " ".join([what, " and ".join(parts)]).strip()

    def check(self, value) -> str | None:
        """None when `value` is within the bounds, else why not."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected {self.describe()}, got {value!r}"
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            return f"expected {self.describe()}, got {value!r}"
        if not math.isfinite(value):
            return f"expected {self.describe()}, got {value!r}"
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and value > self.hi
        if too_low or too_high:
            return f"expected {self.describe()}, got {value!r}"
        return None

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        problem = self.check(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


_SEED = Bounded(int, 0, 2**32 - 1)  # numpy's seed range
_PIXELS = Bounded(int, 16, 8192)  # a frame side: the VAE x patch factor up to the decode limit's side
_BATCH = Bounded(int, 1, 4096)

BOUNDS: dict[str, Bounded] = {
    # sampling
    "num_pairs": Bounded(int, 1, 64),
    "grid_points": Bounded(int, 2, 1000),
    "guidance": Bounded(float, -100.0, 100.0),
    "seed": _SEED,
    "size": _PIXELS,
    "clip_frames": Bounded(int, 1, 257),
    "max_memory": Bounded(float, 0.0, 1 << 20, lo_open=True),  # GiB
    # data
    "resolution": _PIXELS,
    "batch_size": _BATCH,
    "workers": Bounded(int, 0, 256),
    "seconds": Bounded(float, 0.0, 3600.0, lo_open=True),
    "repeats": Bounded(int, 1, 100),
    "copies": Bounded(int, 1, 1000),
    "encode_batch": _BATCH,
    "shard_size": Bounded(int, 1, 1 << 20),
    # eval
    "mask_threshold": Bounded(float, 0.0, 1.0),
    "depth_scale": Bounded(float, 0.0, 1e9, lo_open=True),
    "count": Bounded(int, 0, 10**7),
    "make_set_size": Bounded(int, 0, 8192),
    # demo
    "minutes": Bounded(float, 0.0, 1440.0, lo_open=True),
    "steps": Bounded(int, 1, 10**9),
    "vae_seconds": Bounded(float, 0.0, 86400.0),
    "image_size": Bounded(int, 8, 8192),
    "threads": Bounded(int, 1, 1024),
}

# numeric fields of the training config (train/config.py checks the lower bounds and the relations between
# fields; this adds the upper bounds that only memory would otherwise enforce)
CONFIG_BOUNDS: dict[str, Bounded] = {
    "image_size": Bounded(int, 8, 8192),
    "num_pairs": Bounded(int, 1, 64),
    "num_workers": Bounded(int, 0, 256),
    "steps": Bounded(int, 1, 10**9),
    "batch_size": Bounded(int, 1, 1 << 16),
    "micro_batch_size": Bounded(int, 1, 4096),
    "lr": Bounded(float, 0.0, 10.0, lo_open=True),
    "min_lr": Bounded(float, 0.0, 10.0),
    "warmup_steps": Bounded(int, 0, 10**9),
    "weight_decay": Bounded(float, 0.0, 100.0),
    "eps": Bounded(float, 0.0, 1.0, lo_open=True),
    "grad_clip": Bounded(float, 0.0, 1e6),
    "ema_decay": Bounded(float, 0.0, 1.0),
    "t_std": Bounded(float, 0.0, 100.0, lo_open=True),
    "t_mean": Bounded(float, -100.0, 100.0),
    "context_parallel": Bounded(int, 1, 1024),
    "context_parallel_ulysses": Bounded(int, 0, 1024),
    "seed": _SEED,
    "save_every": Bounded(int, 1, 10**9),
    "keep_last": Bounded(int, 1, 10**6),
    "param_abs_limit": Bounded(float, 0.0, 1e30, lo_open=True),
    "log_every": Bounded(int, 1, 10**9),
    "max_minutes": Bounded(float, 0.0, 10**7, lo_open=True),
    "peak_tflops": Bounded(float, 0.0, 1e6, lo_open=True),
}


def check_config_bounds(cfg, where: str = "config") -> None:
    """Raise ValueError naming the first numeric config field outside CONFIG_BOUNDS (None stays allowed)."""
    for name, bound in CONFIG_BOUNDS.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue
        problem = bound.check(value)
        if problem:
            raise ValueError(f"{where}: field {name!r} (--{name.replace('_', '-')}): {problem}")
