"""qk_norm_rope on the GPU: fused Triton kernel vs the reference (eager and torch.compile),
with achieved bandwidth against a device copy of the same bytes."""

from __future__ import annotations

import time

import torch

from bench.common import cuda_time_ms
from lavin_fast.ops import qk_norm_rope
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope

TITLE = "qk_norm_rope (QK RMSNorm + 3D RoPE), bf16"

# (label, B, frames, h, w, Hq, Hkv, hd): the joint grid of N=4 pairs + query + target at 512 px
CASES = [
    ("3.4B 512px", 2, 10, 32, 32, 32, 8, 72),
    ("1.0B 512px", 2, 10, 32, 32, 16, 16, 64),
    ("3.4B video", 1, 20, 32, 32, 32, 8, 72),
]


def _ref_pair(q, k, qw, kw, grid):
    return reference_rms_norm_rope(q, qw, grid), reference_rms_norm_rope(k, kw, grid)


def _bench_case(label: str, B: int, T: int, H: int, W: int, Hq: int, Hkv: int, hd: int, compiled) -> list[dict]:
    rows = []
    L = T * H * W
    grid = (T, H, W)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, L, Hq, hd, device=dev, dtype=dt)
    k = torch.randn(B, L, Hkv, hd, device=dev, dtype=dt)
    qw = torch.randn(Hq * hd, device=dev, dtype=dt)
    kw = torch.randn(Hkv * hd, device=dev, dtype=dt)
    # correctness on the device first (bf16: relative to the reference's own bf16 error)
    qo, ko = qk_norm_rope(q, k, qw, kw, grid, backend="triton")
    r64 = reference_rms_norm_rope(q.double(), qw.double(), grid)
    err = (qo.double() - r64).abs().max().item()
    ref_err = (reference_rms_norm_rope(q, qw, grid).double() - r64).abs().max().item()
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read once, write once
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = cuda_time_ms(lambda: dst.copy_(src))
    impls = {
        "triton (fused)": lambda: qk_norm_rope(q, k, qw, kw, grid, backend="triton"),
        "torch eager": lambda: _ref_pair(q, k, qw, kw, grid),
        "torch.compile": lambda: compiled(q, k, qw, kw, grid),
    }
    base = None
    for name, fn in impls.items():
        try:
            ms = cuda_time_ms(fn)
        except Exception as exc:  # a baseline that fails is reported, not fatal
            rows.append({"case": label, "impl": name, "note": f"failed: {type(exc).__name__}: {exc}"[:200]})
            continue
        base = base or ms
        fused = name == "triton (fused)"
        rows.append(
            {
                "case": label,
                "pass": "fwd",
                "impl": name,
                "ms": ms,
                "gbps": nbytes / ms / 1e6,
                "pct_of_copy": 100 * copy_ms / ms,
                "speedup_vs_fused": 1.0 if fused else base / ms,
                "max_err": err if fused else None,
                "ref_bf16_err": ref_err if fused else None,
            }
        )
    # forward + backward of the fused op vs eager autograd of the reference
    leaves = [t.detach().requires_grad_() for t in (q, k, qw, kw)]
    grads = (torch.randn_like(q), torch.randn_like(k))
    passes = {
        "triton (fused)": lambda: qk_norm_rope(*leaves, grid, backend="triton"),
        "torch eager": lambda: _ref_pair(*leaves, grid),
    }
    for name, forward in passes.items():
        ms = cuda_time_ms(lambda forward=forward: torch.autograd.backward(forward(), grads))
        rows.append({"case": label, "pass": "fwd+bwd", "impl": name, "ms": ms})
    return rows


def run(budget_s: float) -> list[dict]:
    rows = []
    t_end = time.time() + budget_s
    compiled = torch.compile(_ref_pair)
    for label, *shape in CASES:
        if time.time() > t_end:
            rows.append({"case": label, "note": "skipped: over budget"})
            continue
        rows += _bench_case(label, *shape, compiled)
    return rows
