"""qk_norm_rope on the GPU: fused Triton kernel vs the reference (eager and torch.compile) and, where
flash-attn is importable, its Triton `apply_rotary` (the Hopper library baseline) after torch's RMSNorm,
with achieved bandwidth against a device copy of the same bytes."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import cuda_time_ms
from lavin_fast.ops import qk_norm_rope
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope
from lavin_fast.ops.rope import rope_cos_sin, rope_split

TITLE = "qk_norm_rope (QK RMSNorm + 3D RoPE), bf16"

# (label, B, frames, h, w, Hq, Hkv, hd): the joint grid of N=4 pairs + query + target at 512 px
CASES = [
    ("3.4B 512px", 2, 10, 32, 32, 32, 8, 72),
    ("1.0B 512px", 2, 10, 32, 32, 16, 16, 64),
    ("3.4B video", 1, 20, 32, 32, 32, 8, 72),
]


def _ref_pair(q, k, qw, kw, grid):
    return reference_rms_norm_rope(q, qw, grid), reference_rms_norm_rope(k, kw, grid)


def flash_attn_rope_baseline(q, k, qw, kw, grid):
    """A callable computing qk_norm_rope with flash-attn's `apply_rotary_emb` (rotate-half, in place) on each
    of the three 3D-RoPE chunks after torch's RMSNorm over H*hd; or the reason it is unavailable (a str)."""
    try:
        from flash_attn.layers.rotary import apply_rotary_emb
    except Exception as exc:  # not installed, or built for another torch / CUDA
        return f"flash-attn apply_rotary not importable ({type(exc).__name__}: {str(exc)[:80]})"
    hd = q.shape[-1]
    cos, sin = rope_cos_sin(tuple(grid), hd, 0, q.device)  # [L, hd]: per chunk, the u half then the v half
    chunks, off = [], 0
    for d in rope_split(hd):
        chunks.append((off, d, cos[:, off : off + d // 2].to(q.dtype), sin[:, off : off + d // 2].to(q.dtype)))
        off += d

    def norm(x, w):
        width = x.shape[2] * x.shape[3]
        y = F.rms_norm(x.reshape(*x.shape[:2], width).float(), (width,), eps=1e-6).to(x.dtype) * w
        return y.view_as(x)

    def fn():
        outs = []
        for x, w in ((q, qw), (k, kw)):
            y = norm(x, w)
            for off, d, c, s in chunks:
                apply_rotary_emb(y[..., off : off + d], c, s, interleaved=False, inplace=True)
            outs.append(y)
        return outs

    return fn


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
    flash = flash_attn_rope_baseline(q, k, qw, kw, grid)
    flash_name = "flash-attn apply_rotary + torch RMSNorm"
    flash_err = None
    if isinstance(flash, str):
        rows.append({"case": label, "impl": flash_name, "note": flash})
    else:
        impls[flash_name] = flash
        flash_err = (flash()[0].double() - r64).abs().max().item()
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
                "max_err": err if fused else flash_err if name == flash_name else None,
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
