"""Test helpers shared by every kernel test (importable by users who add kernels too).

- `assert_close_to_reference`: the flash-attention tests' rule. A kernel computing in a low
  precision is judged against a float64 reference, relative to the error that the *same
  reference* makes when run in the kernel's dtype: err(kernel) <= factor * err(ref_lowp) + atol.
  The floor `atol` is tied to the output's own typical size (a few ulps of its RMS), not to its
  largest element: a bound of 16 ulps of the max is 12.5% of the max in bfloat16, wide enough for a
  softmax scale 3% off to pass. A kernel as accurate as PyTorch in its dtype passes; a wrong kernel
  (a 1-3% systematic error) does not, whatever the dtype. tests/test_testing_helpers.py plants
  such bugs and checks that the bound catches them.
- `rms_floor`: that floor for one output or for several (outputs that vanish up to rounding, such
  as dq at sequence length 1, take the floor of the largest of their siblings).
- `poisoned_allocations`: while active, torch.empty / empty_like / empty_strided / new_empty
  return NaN-filled float tensors (and int tensors filled with a sentinel), so an output element
  a kernel forgets to write makes the comparison fail instead of reading stale zeros.
- `triton_test_device`: "cpu" under the Triton interpreter, "cuda" otherwise.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

import torch

from lavin_fast.ops._triton import interpreter_active


def triton_test_device() -> str:
    """Where Triton kernels run in this test process."""
    return "cpu" if interpreter_active() else "cuda"


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rms(t: torch.Tensor) -> float:
    """Root mean square of a tensor (0 for an empty one), computed in float64."""
    return t.double().pow(2).mean().sqrt().item() if t.numel() else 0.0


FLOOR_ULPS = 4.0


def rms_floor(dtype: torch.dtype, *refs: torch.Tensor, ulps: float = FLOOR_ULPS) -> float:
    """`ulps` units of `dtype`'s epsilon at the largest RMS of `refs` (1e-6 at least, for all-zero outputs).

    In bfloat16 (eps 2**-7) the default is 3.1% of the RMS; the largest element of a random
    tensor is typically 3-4x its RMS, so this is about 1% of the max.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return ulps * eps * max([rms(r) for r in refs] + [1e-6])


def assert_close_to_reference(
    actual: torch.Tensor,
    ref_fp64: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Judge `actual` against the float64 reference `ref_fp64`.

    ref_lowp: the reference computed in the kernel's dtype (the precision yardstick). When
    omitted (float64 kernels), a tight absolute bound is used.
    atol: floor of the bound, for outputs where the low-precision reference is exact by luck;
    defaults to `rms_floor(actual.dtype, ref_fp64)`: a few ulps of actual's dtype at the
    reference's RMS (not at its max, which let a 3% systematic error through in bfloat16).
    """
    if actual.shape != ref_fp64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref_fp64.shape)}")
    if not torch.isfinite(actual).all():
        bad = (~torch.isfinite(actual)).sum().item()
        raise AssertionError(f"{name}: {bad} of {actual.numel()} elements are not finite (unwritten or overflow)")
    scale = ref_fp64.double().abs().max().item() if ref_fp64.numel() else 0.0
    if atol is None:
        atol = rms_floor(actual.dtype, ref_fp64)
    err = max_abs_err(actual, ref_fp64)
    ref_err = max_abs_err(ref_lowp, ref_fp64) if ref_lowp is not None else 0.0
    bound = factor * ref_err + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} vs float64 reference exceeds {bound:.3e} "
            f"(= {factor} x reference-in-dtype error {ref_err:.3e} + atol {atol:.1e}); "
            f"reference max |value| {scale:.3e}, RMS {rms(ref_fp64):.3e}"
        )


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(-12345 if t.dtype.is_signed else 123)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make uninitialised allocations visible: every torch.empty* result is filled with NaN."""
    originals = {
        "empty": torch.empty,
        "empty_like": torch.empty_like,
        "empty_strided": torch.empty_strided,
    }
    original_new_empty = torch.Tensor.new_empty

    def wrap(fn):
        def poisoned(*args, **kwargs):
            return _poison(fn(*args, **kwargs))

        return poisoned

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = lambda self, *a, **k: _poison(original_new_empty(self, *a, **k))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = original_new_empty


@contextlib.contextmanager
def time_limit(seconds: float | None, error: Callable[[], BaseException]) -> Iterator[None]:
    """Raise `error()` in the main thread after `seconds` (SIGALRM; a call blocking in C is interrupted when it
    returns to Python), so that a hung test or benchmark fails alone instead of taking its run with it. No limit
    when seconds is None or 0, or where signals are unavailable."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise error()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
