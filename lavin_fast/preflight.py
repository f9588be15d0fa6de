"""A memory pre-flight: before a command allocates what its arguments size, it computes a lower bound of its peak
host memory from those arguments and refuses, with the figure, when that is over what is available (or over
`--max-memory`). A lower bound (the tensors the arguments alone imply, no framework overhead) never refuses a run
that would fit; it stops the ones that would end in a MemoryError, an OOM kill or hours of swapping.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
GIB = 1 << 30


class MemoryPreflightError(ValueError):
    """The arguments imply more memory than is available."""


def available_bytes() -> int:
    """Memory the system can give without swapping (MemAvailable of /proc/meminfo; else physical pages)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: only --max-memory limits


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def check_memory(
    parts: dict[str, float], what: str, max_memory_gib: float | None = None, available: int | None = None
) -> float:
    """Sum `parts` (name -> bytes, a lower bound of each) and raise MemoryPreflightError when the total is over
    `max_memory_gib` (when given) or the available memory. Returns the total."""
    total = float(sum(parts.values()))
    if max_memory_gib is not None:
        limit, source = max_memory_gib * GIB, f"--max-memory {max_memory_gib:g} GiB"
    else:
        limit = available_bytes() if available is None else available
        source = f"the {fmt_bytes(limit)} of memory available"
    log.debug("%s: memory pre-flight %s (limit %s)", what, fmt_bytes(total), fmt_bytes(limit))
    if total > limit:
        top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in top)
        raise MemoryPreflightError(
            f"{what}: these arguments need at least {fmt_bytes(total)} of memory ({detail}), over {source}; "
            "lower the sizes or counts"
        )
    return total


def file_bytes(*paths) -> int:
    """The summed size of the files that exist among `paths` (weights are at least that large in memory)."""
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_size if p else 0
        except (OSError, TypeError, ValueError):
            pass
    return total
