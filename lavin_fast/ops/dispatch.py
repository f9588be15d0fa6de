"""Backend selection for the fused ops.

Each op owns an `OpDispatcher` holding its backends in priority order. A backend declares
what it supports through `refusals(*args, **kwargs) -> list[str]`: an empty list means it
accepts the input, otherwise each string says why not. `auto` takes the first backend that
accepts. A backend asked for by name, through the `backend=` argument or the
`LAVIN_FAST_BACKEND` environment variable (or `LAVIN_FAST_BACKEND_<OP>` for one op), that
refuses the input raises `BackendUnavailable` with its reasons: never a silent fallback.

The priority order of each op is set by GPU measurement (bench/results/); the torch
reference is always last and accepts everything, so `auto` always finds a backend.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A thread-local flag rather than a ContextVar: torch.compile (Dynamo) traces through dispatch
# with fullgraph=True, and it cannot trace ContextVar.get/set.
_STATE = threading.local()


def selection_is_explicit() -> bool:
    """Inside a `refusals` call: True when the backend was asked for by name, False under `auto`.
    Lets a backend accept an input only on request (Triton's CPU interpreter is for tests)."""
    return getattr(_STATE, "explicit", False)


class BackendUnavailable(RuntimeError):
    """A backend that was asked for by name cannot run this input."""


@dataclass
class Backend:
    """One implementation of an op.

    name: short name users select ("torch", "triton", "cuda", ...).
    impl: the function computing the op; takes the op's arguments.
    refusals: returns why this backend cannot run the given arguments (empty: it can).
    """

    name: str
    impl: Callable[..., Any]
    refusals: Callable[..., list[str]] = field(default=lambda *a, **k: [])


_REGISTRY: dict[str, OpDispatcher] = {}


class OpDispatcher:
    """Backends of one op, in priority order."""

    def __init__(self, op_name: str, backends: list[Backend]):
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"op {op_name!r}: duplicate backend names {names}")
        self.op_name = op_name
        self.backends = {b.name: b for b in backends}
        _REGISTRY[op_name] = self

    def requested(self, backend: str | None) -> str:
        """The backend name in force: the argument, else the environment, else "auto"."""
        if backend is not None and backend != "auto":
            return backend
        env = os.environ.get(f"LAVIN_FAST_BACKEND_{self.op_name.upper()}") or os.environ.get("LAVIN_FAST_BACKEND")
        if backend == "auto" and env is None:
            return "auto"
        return env or "auto"

    def select(self, backend: str | None, *args: Any, **kwargs: Any) -> Backend:
        name = self.requested(backend)
        if name == "auto":
            tried = []
            for b in self.backends.values():
                reasons = b.refusals(*args, **kwargs)
                if not reasons:
                    return b
                tried.append(f"{b.name}: {'; '.join(reasons)}")
            raise BackendUnavailable(  # only if even the reference refuses (a bad input)
                f"{self.op_name}: no backend accepts this input:\n  " + "\n  ".join(tried)
            )
        if name not in self.backends:
            raise BackendUnavailable(
                f"{self.op_name}: unknown backend {name!r}; this op has {list(self.backends)} (or 'auto')"
            )
        b = self.backends[name]
        _STATE.explicit = True
        try:
            reasons = b.refusals(*args, **kwargs)
        finally:
            _STATE.explicit = False
        if reasons:
            raise BackendUnavailable(
                f"{self.op_name}: backend {name!r} was requested but refuses this input:\n  - " + "\n  - ".join(reasons)
            )
        return b

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        return self.select(backend, *args, **kwargs).impl(*args, **kwargs)

    def explain(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """For each backend, why it refuses these arguments (empty list: it accepts)."""
        return {name: b.refusals(*args, **kwargs) for name, b in self.backends.items()}


def registered_ops() -> dict[str, OpDispatcher]:
    """All dispatchers created so far (import lavin_fast.ops to load every op)."""
    return dict(_REGISTRY)
