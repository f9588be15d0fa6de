"""The one schema of numeric arguments: each numeric flag of every `lavin-fast` command (`BOUNDS`, used as the
argparse type) and each numeric field of the training config (`CONFIG_BOUNDS`, checked by the config's validation)
declares its range here. Out of range is refused before anything is read or allocated, with the name and the
range; the bounds are wide (what a real run may use) and exist so that a typo such as `--batch-size 1e6` is
an error rather than a MemoryError, an OOM kill or hours of work. Imports nothing from the package.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


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
    "shard_mb": Bounded(float, 0.0, 1e6, lo_open=True),  # a tar shard's target size, MB
    "video_frames": Bounded(int, 1, 257),
    "wait_steps": Bounded(int, 1, 10**5),
    "plan_items": Bounded(int, 1, 10**9),  # a synthetic index: 64 B per item at most (the bench's own bound)
    # plan
    "gpus": Bounded(int, 1, 65536),
    "gpus_per_node": Bounded(int, 1, 64),
    "global_batch": Bounded(int, 1, 1 << 20),
    "micro_batch": Bounded(int, 0, 4096),  # 0: the planner picks
    "latent_frames": Bounded(int, 1, 1024),
    "cp_degree": Bounded(int, 1, 1024),
    "ac_every": Bounded(int, 1, 1024),
    "dp_degree": Bounded(int, 0, 65536),  # 0: auto
    # eval
    "mask_threshold": Bounded(float, 0.0, 1.0),
    "depth_scale": Bounded(float, 0.0, 1e9, lo_open=True),
    "count": Bounded(int, 0, 10**7),
    "make_set_size": Bounded(int, 0, 8192),
    # demo
    "minutes": Bounded(float, 0.0, 1440.0, lo_open=True),
    "steps": Bounded(int, 1, 10**9),
    "vae_steps": Bounded(int, 1, 10**7),
    "crops": Bounded(int, 0, 10**4),
    "samples": Bounded(int, 1, 1000),
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
    "lr": Bounded(float, 0.0, 1e32, lo_open=True),  # wide: a huge lr is caught by the divergence check
    "min_lr": Bounded(float, 0.0, 1e32),
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


TASK_WEIGHT = Bounded(float, 0.0, 1e12)
"""a task's sampling weight in a config's data section (relative: the weights are renormalised over the tasks)"""


def task_weights_problem(weights) -> str | None:
    """None when `weights` is a {task name: weight} mapping of numbers in TASK_WEIGHT's range, not all 0; else
    what is wrong (the task names themselves are the caller's to check)."""
    if not isinstance(weights, dict) or not weights:
        return f"expected a non-empty mapping of task names to weights, got {weights!r:.200}"
    for task, w in weights.items():
        if not isinstance(task, str) or not task:
            return f"task names must be non-empty strings, got {task!r}"
        problem = TASK_WEIGHT.check(w)
        if problem:
            return f"task {task!r}: weights must be >= 0: {problem}"
    if not sum(weights.values()) > 0:
        return f"the weights sum to 0 ({weights}): at least one task needs a weight > 0"
    return None


def check_config_bounds(cfg, where: str = "config") -> None:
    """Raise ValueError naming the first numeric config field outside CONFIG_BOUNDS (None stays allowed)."""
    for name, bound in CONFIG_BOUNDS.items():
        value = getattr(cfg, name, None)
        if value is None:
            continue
        problem = bound.check(value)
        if problem:
            raise ValueError(f"{where}: field {name!r} (--{name.replace('_', '-')}): {problem}")
