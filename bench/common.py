"""Timing helpers shared by the GPU benchmarks: thin wrappers over Triton's `triton.testing.do_bench`
(L2 flushed before every timed call) and `do_bench_cudagraph` (launch overhead removed)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, flush_l2: bool = True) -> float:
    """Median milliseconds of fn() on the current CUDA stream, through `triton.testing.do_bench`.

    do_bench takes time budgets, not counts: a first call (which compiles) and a second, timed one give an
    estimate, and the budgets are that estimate times `warmup` (less the two calls made) and `iters`, so
    that about that many calls run (do_bench adds one call and its own 5-call estimate). do_bench always flushes L2 between calls; `flush_l2=False` is accepted
    for the callers that pass it (whole-model steps and 1 GiB copies, where L2 state does not matter) and
    changes nothing."""
    del flush_l2  # do_bench flushes L2 before each call, outside the timed region
    from triton.testing import do_bench

    fn()  # compiles (Triton, torch.compile) outside the estimate
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    estimate_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    warmup_ms = max(warmup - 2, 1) * estimate_ms
    return float(do_bench(fn, warmup=warmup_ms, rep=max(iters, 1) * estimate_ms, return_mode="median"))


def cuda_graph_time_ms(fn: Callable[[], object], *, rep_ms: float = 20.0) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`): for
    launch-bound work (small kernels, many launches) where the host's launch cost would hide the kernel's.
    fn must be graph-capturable (no host synchronisation, no allocation that changes between calls)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), flush_l2=False)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def peak_memory_mib(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during fn(), above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
