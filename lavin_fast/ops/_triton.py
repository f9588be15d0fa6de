"""Triton availability and the interpreter switch, shared by every Triton-backed op.

`TRITON_INTERPRET=1` must be set before Triton kernels are defined (Triton reads it in
`@triton.jit`), so the choice is made once per process: the tests set it in conftest.py.
"""

from __future__ import annotations

import os

import torch


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


# probed once at import (a plain constant, which torch.compile traces without a cache wrapper)
_TRITON_IMPORT_ERROR = _probe_triton()


def triton_import_error() -> str | None:
    """None if Triton imports, else why not."""
    return _TRITON_IMPORT_ERROR


def triton_refusals(*tensors: torch.Tensor) -> list[str]:
    """Reasons the Triton backend cannot run on these tensors (empty list: it can).

    On CUDA tensors Triton compiles for the GPU; on CPU tensors it runs only under the
    interpreter and only when asked for by name, since it exists for testing (it is orders of
    magnitude slower).
    """
    err = triton_import_error()
    if err:
        return [err]
    reasons = []
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return reasons
    if devices == {"cpu"}:
        from lavin_fast.ops.dispatch import selection_is_explicit

        if not interpreter_active():
            reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)")
        elif not selection_is_explicit():
            reasons.append("CPU tensors: `auto` takes the torch path; the Triton interpreter runs only by name")
        return reasons
    reasons.append(f"tensors on devices {sorted(devices)}; Triton needs all on CUDA (or CPU + interpreter)")
    return reasons


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _interpreter_loop_bounds_fix() -> None:
    """Let the interpreter take kernel scalars as `range` bounds under numpy >= 2.4.

    The interpreter holds scalars as 1-element arrays and its `__index__` calls int() on them,
    which numpy 2.4 refuses for arrays with a dimension. Re-register `__index__` taking the one
    element (GPU compilation does not use this path).
    """
    from triton.runtime import interpreter as interp

    if getattr(interp._patch_lang_tensor, "_lavin_fast_fixed", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._lavin_fast_fixed = True
    interp._patch_lang_tensor = patched


if interpreter_active() and triton_import_error() is None:  # every Triton op module imports this one
    _interpreter_loop_bounds_fix()


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the tensor descriptors that kernels build on the device (tl.make_tensor_descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tma_scratch() -> None:
    """Give Triton the allocator for in-kernel tensor descriptors. Triton keeps it in a context variable, so the
    thread that launches sets it (autograd runs the backward in a thread of its own); the interpreter needs none."""
    if not interpreter_active():
        import triton

        triton.set_allocator(_tma_scratch)
