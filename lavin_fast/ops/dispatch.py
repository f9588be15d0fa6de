"""Backend selection for the fused ops.

Each op owns an `OpDispatcher` holding its backends in priority order. A backend declares
what it supports through `refusals(*args, **kwargs) -> list[str]`: an empty list means it
accepts the input, otherwise each string says why not. `auto` takes the first backend that
accepts. A backend asked for by name refuses the input -> `BackendUnavailable` with its reasons:
never a silent fallback. Where the name comes from, first match wins:
1. the `backend=` argument of the call (anything but "auto");
2. `use_backend(name, op=...)`, a context manager scoped to the current thread (innermost first);
3. the environment, `LAVIN_FAST_BACKEND_<OP>` then `LAVIN_FAST_BACKEND`. It is process-wide: every
   thread sees it. It is read at each call (not once at import) so that a variable set by a launcher
   or a test after import still applies; use `use_backend` to choose per thread or per block of code.

The priority order of each op is set by GPU measurement (bench/results/); the torch
reference is always last and accepts everything, so `auto` always finds a backend.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# A thread-local flag rather than a ContextVar: torch.compile (Dynamo) traces through dispatch
# with fullgraph=True, and it cannot trace ContextVar.get/set.
_STATE = threading.local()


def _scopes() -> list[tuple[str | None, str]]:
    if not hasattr(_STATE, "scopes"):
        _STATE.scopes = []
    return _STATE.scopes


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None) -> Iterator[None]:
    """Use backend `name` for `op` (or for every op) inside the `with` block, in this thread only.

    It takes precedence over the environment and yields to an explicit `backend=` argument; nested
    blocks win over outer ones. A backend chosen this way counts as asked for by name: one that
    refuses an input raises instead of falling back. `name="auto"` restores automatic choice.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"use_backend: name must be a backend name such as 'torch' or 'auto', got {name!r}")
    if op is not None:
        if op not in _REGISTRY:
            raise ValueError(f"use_backend: unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
        if name != "auto" and name not in _REGISTRY[op].backends:
            raise ValueError(f"use_backend: op {op!r} has no backend {name!r}; it has {list(_REGISTRY[op].backends)}")
    scopes = _scopes()
    scopes.append((op, name))
    try:
        yield
    finally:
        scopes.pop()


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
        """The backend name in force: the argument, else a `use_backend` scope, else the environment, else
        "auto"."""
        if backend is not None and backend != "auto":
            return backend
        for op, name in reversed(_scopes()):
            if op is None or op == self.op_name:
                return name
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


def requested_backend(op_name: str, backend: str | None = None) -> str:
    """The backend name in force for a registered op (argument, `use_backend` scope, environment, else "auto"):
    for code that follows an op's choice without being that op (the J-DiT's CPU kernels follow the sandwich norm's)."""
    return _REGISTRY[op_name].requested(backend)


def registered_ops() -> dict[str, OpDispatcher]:
    """All dispatchers created so far (import lavin_fast.ops to load every op)."""
    return dict(_REGISTRY)
