"""The J-DiT's memory-bound CPU ops as one C++ pass each, forward and backward (csrc/cpu_fused.cpp, loaded by
lavin_fast/ops/_cpu.py), behind autograd Functions.

    rms_norm_modulate(x, scale)             RMSNorm(x) * (1 + scale)              (ops/sandwich_norm.py)
    gated_rms_norm_residual(res, h, gate)   res + tanh(gate) * RMSNorm(h)         (ops/sandwich_norm.py)
    swiglu(gu)                              SiLU(gate) * up, gu = [gate | up]
    qkv_prep(tc, tx, ...)                   per stream QK RMSNorm * weight, then per segment the cond and x
                                            tokens' q|k rotated by 3D RoPE and v, written head-major
                                            (JointAttention._forward_torch's chain: norm, concatenations, RoPE)

The two sandwich norms are the "cpu" backend of their dispatchers (ops/sandwich_norm.py: `auto` takes it before
the torch forms; `modulate_refusals` / `gated_refusals` say why not). `swiglu` and `qkv_prep` return None when the
kernels cannot take the call (library absent or switched off, a dtype other than float32, a tensor subclass, a
traced call, a shape the kernel does not cover) and the model runs its torch form; either way the values agree to
float32 rounding. The references are the
torch forms (lavin_fast/ops/torch_grads.py, ops/rope.py); tests/test_cpu_fused.py checks both directions against
float64 autograd of those references.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from lavin_fast.ops import _cpu
from lavin_fast.ops.rope import rope_split


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def refusals(*ts: torch.Tensor) -> list[str]:
    """Why the kernels cannot take these tensors (empty: they can): the library, then plain dense float32 CPU
    tensors outside a trace (FakeTensors, DTensors and other subclasses have no data pointer to hand over)."""
    if torch.compiler.is_compiling():  # first: nothing below is traced
        return ["traced by torch.compile (Inductor fuses the torch forms itself)"]
    if _cpu.library() is None:
        return [_cpu.status()[1]]
    out = []
    for t in ts:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            out.append(f"a {type(t).__name__} ({t.layout}) is not a plain dense tensor")
        elif t.device.type != "cpu" or t.dtype != torch.float32:
            out.append(f"the kernels take float32 CPU tensors, got {t.dtype} on {t.device}")
    return out


def _eligible(*ts: torch.Tensor) -> bool:
    return not refusals(*ts)


def modulate_refusals(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> list[str]:
    out = refusals(x, scale)
    if not out and (x.dim() != 3 or scale.shape != (x.shape[0], x.shape[-1]) or x.numel() == 0):
        out.append(f"the kernel takes x [B, L, D] and scale [B, D], got {tuple(x.shape)} and {tuple(scale.shape)}")
    return out


def gated_refusals(residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6) -> list[str]:
    out = refusals(residual, h, gate)
    if not out and (
        h.dim() != 3 or residual.shape != h.shape or gate.shape != (h.shape[0], h.shape[-1]) or h.numel() == 0
    ):
        out.append(
            f"the kernel takes residual, h [B, L, D] and gate [B, D], got {tuple(residual.shape)}, "
            f"{tuple(h.shape)} and {tuple(gate.shape)}"
        )
    return out


def _threads() -> int:
    return torch.get_num_threads()


def _run(fn, *args) -> None:
    """One kernel call through ctypes, named lavin_fast::<symbol> in torch.profiler's tables (which do not see
    ctypes calls otherwise). The bindings check sizes first: a nonzero code is a bug in them, not bad input."""
    with torch.profiler.record_function(f"lavin_fast::{fn.__name__}"):
        code = fn(*args)
    if code != 0:
        raise RuntimeError(f"lavin_fast CPU kernel {fn.__name__} refused its arguments (code {code})")


# ---------------------------------------------------------------------------------------------------------------
# The sandwich norms: RMSNorm(x) * (1 + scale) and residual + tanh(gate) * RMSNorm(x). One autograd Function: the
# two backward entry points take the same arguments (dy, x, rstd, scale or gate -> dx, d(scale or gate)).
# ---------------------------------------------------------------------------------------------------------------
def _norm_fwd(lib, x, param, residual, eps):
    """The modulated norm (residual None) or the gated one; returns (out, rstd)."""
    B, L, D = x.shape
    out = torch.empty_like(x)
    rstd = torch.empty(B, L, dtype=torch.float32)
    if residual is None:
        _run(lib.lavin_cpu_rms_modulate_fwd, _ptr(x), _ptr(param), B, L, D, eps, _ptr(out), _ptr(rstd), _threads())
    else:
        args = (_ptr(residual), _ptr(x), _ptr(param), B, L, D, eps, _ptr(out), _ptr(rstd), _threads())
        _run(lib.lavin_cpu_gated_fwd, *args)
    return out, rstd


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, param, residual, eps, lib):
        out, rstd = _norm_fwd(lib, x, param, residual, eps)
        ctx.save_for_backward(x, param, rstd)
        ctx.lib, ctx.gated = lib, residual is not None
        return out

    @staticmethod
    @once_differentiable  # the C++ backward builds no graph: a second derivative is an error, not a silent zero
    def backward(ctx, dy):
        x, param, rstd = ctx.saved_tensors
        B, L, D = x.shape
        dy = dy.contiguous()
        dx, dparam = torch.empty_like(x), torch.empty_like(param)
        fn = ctx.lib.lavin_cpu_gated_bwd if ctx.gated else ctx.lib.lavin_cpu_rms_modulate_bwd
        _run(fn, _ptr(dy), _ptr(x), _ptr(rstd), _ptr(param), B, L, D, _ptr(dx), _ptr(dparam), _threads())
        n = ctx.needs_input_grad  # d(residual) = d(out): returned as is, no copy
        return dx if n[0] else None, dparam if n[1] else None, dy if n[2] else None, None, None


def _norm(x, param, residual, eps):
    lib = _cpu.library()
    x, param = x.contiguous(), param.contiguous()
    residual = None if residual is None else residual.contiguous()
    inputs = (x, param) if residual is None else (x, param, residual)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _NormFn.apply(x, param, residual, float(eps), lib)
    return _norm_fwd(lib, x, param, residual, float(eps))[0]


def _refuse(op: str, reasons: list[str]) -> None:
    """A raw pointer must never see a tensor the kernel does not take: called directly (not through the sandwich
    norm's dispatcher, which has already asked), a refused input is an error before any work."""
    if reasons:
        raise ValueError(f"{op}: the CPU kernel does not take this input: " + "; ".join(reasons))


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x [B, L, D], scale [B, D] float32 on the CPU: the sandwich norm's "cpu" backend."""
    _refuse("rms_norm_modulate", modulate_refusals(x, scale, eps))
    return _norm(x, scale, None, eps)


def gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """residual, h [B, L, D], gate [B, D] float32 on the CPU: the sandwich norm's "cpu" backend."""
    _refuse("gated_rms_norm_residual", gated_refusals(residual, h, gate, eps))
    return _norm(h, gate, residual, eps)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------------------------
def _swiglu_fwd(lib, gu):
    F = gu.shape[-1] // 2
    N = gu.numel() // (2 * F)
    y = gu.new_empty((*gu.shape[:-1], F))
    _run(lib.lavin_cpu_swiglu_fwd, _ptr(gu), N, F, _ptr(y), _threads())
    return y


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu, lib):
        ctx.save_for_backward(gu)
        ctx.lib = lib
        return _swiglu_fwd(lib, gu)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (gu,) = ctx.saved_tensors
        F = gu.shape[-1] // 2
        dy = dy.contiguous()
        dgu = torch.empty_like(gu)
        _run(ctx.lib.lavin_cpu_swiglu_bwd, _ptr(dy), _ptr(gu), gu.numel() // (2 * F), F, _ptr(dgu), _threads())
        return dgu, None


def swiglu(gu: torch.Tensor) -> torch.Tensor | None:
    """SiLU(gate) * up of gu = [gate | up] (float32 CPU, even last dim); None where the kernel does not apply."""
    if not _eligible(gu) or gu.dim() < 1 or gu.shape[-1] % 2 or gu.numel() == 0:
        return None
    gu, lib = gu.contiguous(), _cpu.library()
    if torch.is_grad_enabled() and gu.requires_grad:
        return _SwiGLUFn.apply(gu, lib)
    return _swiglu_fwd(lib, gu)


# ---------------------------------------------------------------------------------------------------------------
# QK RMSNorm + 3D RoPE + head-major layout of q|k and v
# ---------------------------------------------------------------------------------------------------------------
@functools.cache
def rope_pairs(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partner [hd] int32, sign [hd] float32): per column of each RoPE chunk [u | v], the column it rotates with
    and the sign of that term (u gets -v * sin, v gets +u * sin; ops/rope.py's rope_rotate)."""
    partner, sign = [], []
    start = 0
    for d in rope_split(head_dim):
        h = d // 2
        partner += [start + h + j for j in range(h)] + [start + j for j in range(h)]
        sign += [-1.0] * h + [1.0] * h
        start += d
    return torch.tensor(partner, dtype=torch.int32), torch.tensor(sign, dtype=torch.float32)


class _QkvPrepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tc, tx, qw_c, kw_c, qw_x, kw_x, plan):
        outs, rstds = _qkv_forward(plan, tc, tx, (qw_c, kw_c), (qw_x, kw_x), keep_rstd=True)
        ctx.save_for_backward(tc, tx, qw_c, kw_c, qw_x, kw_x, *rstds)
        ctx.plan = plan
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        tc, tx, qw_c, kw_c, qw_x, kw_x, rstd_c, rstd_x = ctx.saved_tensors
        plan = ctx.plan
        lib, (H, Hkv, hd), pairs = plan["lib"], plan["heads"], plan["pairs"]
        streams = {"c": (tc, (qw_c, kw_c), rstd_c), "x": (tx, (qw_x, kw_x), rstd_x)}
        dts = {s: (torch.empty_like if plan["tiled"][s] else torch.zeros_like)(t) for s, (t, _, _) in streams.items()}
        dws = {s: torch.zeros((H + Hkv) * hd, dtype=torch.float32) for s in streams}
        for i, seg in enumerate(plan["segments"]):
            dqk, dv = grads[2 * i], grads[2 * i + 1]
            Lseg = seg["Lseg"]
            B = tc.shape[0]
            dqk = torch.zeros(B, H + Hkv, Lseg, hd) if dqk is None else dqk.contiguous()
            dv = torch.zeros(B, Hkv, Lseg, hd) if dv is None else dv.contiguous()
            for s, tok0, ntok, row0 in seg["parts"]:
                t, (qw, kw), rstd = streams[s]
                _run(
                    lib.lavin_cpu_qkv_prep_bwd, _ptr(dqk), _ptr(dv), _ptr(t), _ptr(rstd), B, t.shape[1], H, Hkv, hd,
                    tok0, ntok, _ptr(qw), _ptr(kw), _ptr(seg["cos"]), _ptr(seg["sin"]), _ptr(pairs[0]),
                    _ptr(pairs[1]), Lseg, row0, _ptr(dts[s]), _ptr(dws[s]), _threads(),
                )  # fmt: skip
        n = ctx.needs_input_grad
        nq = H * hd
        return (
            dts["c"] if n[0] else None,
            dts["x"] if n[1] else None,
            dws["c"][:nq] if n[2] else None,
            dws["c"][nq:] if n[3] else None,
            dws["x"][:nq] if n[4] else None,
            dws["x"][nq:] if n[5] else None,
            None,
        )


def _qkv_forward(plan, tc, tx, wc, wx, keep_rstd):
    lib, (H, Hkv, hd), pairs = plan["lib"], plan["heads"], plan["pairs"]
    B = tc.shape[0]
    streams = {"c": (tc, wc), "x": (tx, wx)}
    rstds = {s: torch.empty(B, t.shape[1], 2) if keep_rstd else None for s, (t, _) in streams.items()}
    outs = []
    for seg in plan["segments"]:
        Lseg = seg["Lseg"]
        qk = torch.empty(B, H + Hkv, Lseg, hd)
        v = torch.empty(B, Hkv, Lseg, hd)
        for s, tok0, ntok, row0 in seg["parts"]:
            t, (qw, kw) = streams[s]
            _run(
                lib.lavin_cpu_qkv_prep_fwd, _ptr(t), B, t.shape[1], H, Hkv, hd, tok0, ntok, _ptr(qw), _ptr(kw),
                _ptr(seg["cos"]), _ptr(seg["sin"]), _ptr(pairs[0]), _ptr(pairs[1]), plan["eps"], _ptr(qk), _ptr(v),
                Lseg, row0, _ptr(rstds[s]), _threads(),
            )  # fmt: skip
        outs += [qk, v]
    return outs, (rstds["c"], rstds["x"])


def _tiles(ranges: list[tuple[int, int]], total: int) -> bool | None:
    """True when the (start, length) ranges cover [0, total) exactly once, False when they are disjoint but leave
    gaps, None when two overlap (the backward writes each token's gradient once)."""
    covered = 0
    end = 0
    for start, n in sorted(r for r in ranges if r[1] > 0):
        if start < end:
            return None
        covered += n
        end = start + n
    return covered == total


def qkv_prep(
    tc: torch.Tensor,
    tx: torch.Tensor,
    norm_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    heads: tuple[int, int, int],
    segments: list[dict],
    eps: float,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per segment (qk [B, H + Hkv, L, hd] normed and rotated, v [B, Hkv, L, hd]), from the fused projections
    tc [B, Lc, W], tx [B, Lx, W] (W = (H + 2 Hkv) hd, rows [q | k | v]); None where the kernel does not apply.

    norm_weights: (cond q, cond k, x q, x k) weights [H hd] / [Hkv hd]. segments: dicts with the cond tokens
    (c_start, c_len), then the x tokens (x_start, x_len), and the RoPE tables cos, sin [c_len + x_len, hd] of
    that joint sequence (ops/rope.py's rope_tables)."""
    H, Hkv, hd = heads
    if not _eligible(tc, tx, *norm_weights) or tc.dim() != 3 or tx.dim() != 3:
        return None
    W = (H + 2 * Hkv) * hd
    if tc.shape[0] != tx.shape[0] or tc.shape[2] != W or tx.shape[2] != W or tc.shape[0] == 0:
        return None
    if tuple(w.numel() for w in norm_weights) != (H * hd, Hkv * hd, H * hd, Hkv * hd):
        return None
    tiled = {
        "c": _tiles([(s["c_start"], s["c_len"]) for s in segments], tc.shape[1]),
        "x": _tiles([(s["x_start"], s["x_len"]) for s in segments], tx.shape[1]),
    }
    if None in tiled.values():
        return None
    plan_segs = []
    for s in segments:
        Lseg = s["c_len"] + s["x_len"]
        cos, sin = s["cos"], s["sin"]
        if Lseg == 0 or not _eligible(cos, sin) or cos.shape != (Lseg, hd) or sin.shape != (Lseg, hd):
            return None
        parts = [p for p in (("c", s["c_start"], s["c_len"], 0), ("x", s["x_start"], s["x_len"], s["c_len"])) if p[2]]
        plan_segs.append({"Lseg": Lseg, "cos": cos.contiguous(), "sin": sin.contiguous(), "parts": parts})
    plan = {
        "lib": _cpu.library(), "heads": (H, Hkv, hd), "pairs": rope_pairs(hd), "eps": float(eps),
        "segments": plan_segs, "tiled": tiled,
    }  # fmt: skip
    tc, tx = tc.contiguous(), tx.contiguous()
    weights = [w.contiguous() for w in norm_weights]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (tc, tx, *weights)):
        outs = _QkvPrepFn.apply(tc, tx, *weights, plan)
    else:
        outs = _qkv_forward(plan, tc, tx, tuple(weights[:2]), tuple(weights[2:]), keep_rstd=False)[0]
    return [(outs[2 * i], outs[2 * i + 1]) for i in range(len(segments))]
