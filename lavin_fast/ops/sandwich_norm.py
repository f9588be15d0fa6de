"""Sandwich norm of the J-DiT block: `rms_norm_modulate` (pre-norm) and `gated_rms_norm_residual`
(post-norm, tanh gate, residual add), forward and backward.

    rms_norm_modulate(x, scale)             = RMSNorm(x) * (1 + scale)
    gated_rms_norm_residual(residual, h, g) = residual + tanh(g) * RMSNorm(h)

RMSNorm has no affine weight; x, residual, h are [B, L, D], scale and gate are [B, D] and broadcast
over the L tokens. Both ops are memory-bound: the floor is one read of every [B, L, D] input and
one write of every [B, L, D] output (see docs/sandwich_norm.md for the byte counts).

Numerics: float32 from load to store (float64 for float64 reference inputs), one rounding to the
input dtype at the end. Backward: d(residual) = d(out) (returned as is, no copy); dx / dh recompute
the row's 1/rms instead of saving it (one extra reduction in registers, no extra traffic);
dscale / dgate are reduced over the tokens through per-row-group float32 partial sums and a small
deterministic sum (no atomics), so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lavin_fast.ops._checks import check_positive_float
from lavin_fast.ops._triton import interpreter_active, next_power_of_2, triton_refusals
from lavin_fast.ops.aot import AotSpec, register_aot
from lavin_fast.ops.dispatch import Backend, OpDispatcher

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 16384  # widest row any backend supports (the models use 512 .. 2304)


# ----------------------------------------------------------------------------------------------
# 1. Reference (plain PyTorch): the numerical specification and the CPU path.
# ----------------------------------------------------------------------------------------------
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def reference_rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale) for x [B, L, D], scale [B, D]; float32 math (float64 for float64)."""
    c = _compute_dtype(x)
    xf = x.to(c)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1 + scale.to(c)[:, None, :])).to(x.dtype)


def reference_gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """residual + tanh(gate) * RMSNorm(h) for residual, h [B, L, D], gate [B, D]; float32 math."""
    c = _compute_dtype(h)
    hf = h.to(c)
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return (residual.to(c) + torch.tanh(gate.to(c))[:, None, :] * normed).to(residual.dtype)


# ----------------------------------------------------------------------------------------------
# Validation (once, in the public functions, before any work).
# ----------------------------------------------------------------------------------------------
def _check_rows(name: str, t: object) -> tuple[int, int, int]:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, L, D], got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B, L, D], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    B, L, D = t.shape
    if not 1 <= D <= MAX_D:
        raise ValueError(f"{name} has D={D} columns; supported: 1 <= D <= {MAX_D}")
    if D > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} rows must be contiguous (stride 1 along D), got strides {tuple(t.stride())}; call .contiguous()"
        )
    return B, L, D


def _check_vector(name: str, t: object, ref_name: str, ref: torch.Tensor) -> None:
    B, _, D = ref.shape
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, D], got {type(t).__name__}")
    if tuple(t.shape) != (B, D):
        raise ValueError(
            f"{name} must be [B, D] = {(B, D)} to match {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}; cast it with .to()")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if D > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along D, got strides {tuple(t.stride())}")


def _check_eps(eps: object) -> float:
    return check_positive_float("eps", eps)


def check_modulate_inputs(x: torch.Tensor, scale: torch.Tensor, eps: float) -> float:
    """Validate rms_norm_modulate's arguments (ValueError naming the argument); returns eps."""
    _check_rows("x", x)
    _check_vector("scale", scale, "x", x)
    return _check_eps(eps)


def check_gated_inputs(residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float) -> float:
    """Validate gated_rms_norm_residual's arguments (ValueError naming the argument); returns eps."""
    _check_rows("h", h)
    _check_rows("residual", residual)
    if residual.shape != h.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from h shape {tuple(h.shape)}")
    if residual.dtype != h.dtype:
        raise ValueError(f"residual dtype {residual.dtype} differs from h dtype {h.dtype}; cast it with .to()")
    if residual.device != h.device:
        raise ValueError(f"residual is on {residual.device} but h is on {h.device}")
    _check_vector("gate", gate, "h", h)
    return _check_eps(eps)


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels. Forward: one program per row (token), the whole row in registers.
#    Backward: one program per group of ROWS consecutive tokens of one batch element; it writes
#    dx/dh per row and one float32 partial row of dscale/dgate (summed afterwards in torch).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # exp of a non-positive argument: no overflow for any gate value
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _modulate_fwd_kernel(x_ptr, scale_ptr, y_ptr, L, D, stride_xb, stride_xl, stride_sb, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    s = tl.load(scale_ptr + b * stride_sb + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (x * rstd * (1.0 + s)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_fwd_kernel(
    res_ptr, h_ptr, gate_ptr, out_ptr, L, D, stride_rb, stride_rl, stride_hb, stride_hl, stride_gb, eps,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(h_ptr + b * stride_hb + l * stride_hl + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    t = _tanh(tl.load(gate_ptr + b * stride_gb + cols, mask=mask, other=0.0).to(tl.float32))
    r = tl.load(res_ptr + b * stride_rb + l * stride_rl + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, (r + t * (h * rstd)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_rows(
    x_ptr, dy_ptr, dx_ptr, b, grp, coef, L, D, stride_xb, stride_xl, stride_dyb, stride_dyl, eps, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Shared backward body: for the rows of one group, g = dy * coef, y = n(x) * coef,
    dx = rstd * g - x * rstd^3 * sum(g * x) / D; returns sum over rows of dy * n(x)."""
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS):
        l = grp * ROWS + i
        mask = cmask & (l < L)
        x = tl.load(x_ptr + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + b * stride_dyb + l * stride_dyl + cols, mask=mask, other=0.0).to(tl.float32)
        g = dy * coef
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        c = rstd * rstd * rstd * tl.sum(g * x, axis=0) / D
        dx = rstd * g - x * c
        tl.store(dx_ptr + (b * L + l) * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc += dy * (x * rstd)
    return acc


@triton.jit
def _modulate_bwd_kernel(
    x_ptr, scale_ptr, dy_ptr, dx_ptr, part_ptr, L, D, G, stride_xb, stride_xl, stride_sb, stride_dyb, stride_dyl,
    eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    grp = pid - b * G
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    coef = 1.0 + tl.load(scale_ptr + b * stride_sb + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = _norm_bwd_rows(
        x_ptr, dy_ptr, dx_ptr, b, grp, coef, L, D, stride_xb, stride_xl, stride_dyb, stride_dyl, eps, ROWS,
        BLOCK_D,
    )  # fmt: skip
    tl.store(part_ptr + pid * D + cols, acc, mask=cmask)


@triton.jit
def _gated_bwd_kernel(
    h_ptr, gate_ptr, dout_ptr, dh_ptr, part_ptr, L, D, G, stride_hb, stride_hl, stride_gb, stride_db, stride_dl,
    eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    grp = pid - b * G
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    coef = _tanh(tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32))
    acc = _norm_bwd_rows(
        h_ptr, dout_ptr, dh_ptr, b, grp, coef, L, D, stride_hb, stride_hl, stride_db, stride_dl, eps, ROWS,
        BLOCK_D,
    )  # fmt: skip
    tl.store(part_ptr + pid * D + cols, acc, mask=cmask)


def _launch_config(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the whole row in one program, ~8-16 elements per thread."""
    block_d = next_power_of_2(D)
    if interpreter_active():
        return block_d, 1
    return block_d, min(16, max(1, block_d // 256))


def bwd_rows_per_group(n_rows: int, D: int) -> int:
    """Tokens per backward program (both backends). More rows per group shrink the float32 partial
    sums (4 / (ROWS * 3 * itemsize) of the traffic); fewer give more programs to fill the GPU.
    The largest of 4, 16, 64 that still leaves ~1k (D >= 2048) or ~2k groups (8+ per SM on 132 SMs).
    Three values only: ROWS is a Triton constexpr (the interpreter cannot loop to a run-time bound)
    and each value is one more compile."""
    target = 1024 if D >= 2048 else 2048
    for rows in (64, 16):
        if n_rows // rows >= target:
            return rows
    return 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _triton_modulate_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    x, scale = _rows(x), _rows(scale)
    B, L, D = x.shape
    y = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_d, warps = _launch_config(D)
    _modulate_fwd_kernel[(B * L,)](
        x, scale, y, L, D, x.stride(0), x.stride(1), scale.stride(0), eps, BLOCK_D=block_d, num_warps=warps
    )
    return y


def _triton_gated_fwd(residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    residual, h, gate = _rows(residual), _rows(h), _rows(gate)
    B, L, D = h.shape
    out = torch.empty((B, L, D), dtype=residual.dtype, device=h.device)
    if out.numel() == 0:
        return out
    block_d, warps = _launch_config(D)
    _gated_fwd_kernel[(B * L,)](
        residual, h, gate, out, L, D, residual.stride(0), residual.stride(1), h.stride(0), h.stride(1),
        gate.stride(0), eps, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


def _triton_modulate_bwd(dy, x, scale, eps, rows):
    B, L, D = x.shape
    G = triton.cdiv(L, rows)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    part = torch.empty((B, G, D), dtype=torch.float32, device=x.device)
    block_d, warps = _launch_config(D)
    _modulate_bwd_kernel[(B * G,)](
        x, scale, dy, dx, part, L, D, G, x.stride(0), x.stride(1), scale.stride(0), dy.stride(0), dy.stride(1),
        eps, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return dx, part


def _triton_gated_bwd(dout, h, gate, eps, rows):
    B, L, D = h.shape
    G = triton.cdiv(L, rows)
    dh = torch.empty((B, L, D), dtype=h.dtype, device=h.device)
    part = torch.empty((B, G, D), dtype=torch.float32, device=h.device)
    block_d, warps = _launch_config(D)
    _gated_bwd_kernel[(B * G,)](
        h, gate, dout, dh, part, L, D, G, h.stride(0), h.stride(1), gate.stride(0), dout.stride(0),
        dout.stride(1), eps, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return dh, part


# ----------------------------------------------------------------------------------------------
# 3. torch.library registration, one op family per kernel backend ("triton", "cuda"), so that
#    torch.compile / FSDP / activation checkpointing see one opaque op per call.
# ----------------------------------------------------------------------------------------------
def _bwd_common(kind: str, fn, dy: torch.Tensor, x: torch.Tensor, vec: torch.Tensor, eps: float):
    """Run a backward launcher; returns (dx, sum of the partial rows over tokens, float32 [B, D])."""
    dy, x, vec = _rows(dy), _rows(x), _rows(vec)
    B, L, D = x.shape
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros((B, D), dtype=torch.float32, device=x.device)
    dx, part = fn(dy, x, vec, eps, bwd_rows_per_group(B * L, D))
    return dx, part.sum(1)  # a fixed-order reduction: deterministic


_KERNELS = {
    "triton": (_triton_modulate_fwd, _triton_modulate_bwd, _triton_gated_fwd, _triton_gated_bwd),
}


def _cuda_kernels():
    from lavin_fast.ops import _cuda

    return (_cuda.rms_norm_modulate_fwd, _cuda.rms_norm_modulate_bwd, _cuda.gated_rms_norm_residual_fwd,
            _cuda.gated_rms_norm_residual_bwd)  # fmt: skip


def _kernels(kind: str):
    return _KERNELS[kind] if kind in _KERNELS else _cuda_kernels()


def _register_ops(kind: str):
    """Custom ops lavin_fast::{rms_norm_modulate,gated_rms_norm_residual}_{fwd,bwd}_<kind>."""

    @torch.library.custom_op(f"lavin_fast::rms_norm_modulate_fwd_{kind}", mutates_args=())
    def modulate_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return _kernels(kind)[0](x, scale, eps)

    @modulate_fwd.register_fake
    def _(x, scale, eps):
        return x.new_empty(x.shape)

    @torch.library.custom_op(f"lavin_fast::rms_norm_modulate_bwd_{kind}", mutates_args=())
    def modulate_bwd(
        dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dx, dscale = _bwd_common(kind, _kernels(kind)[1], dy, x, scale, eps)
        return dx, dscale.to(scale.dtype)

    @modulate_bwd.register_fake
    def _(dy, x, scale, eps):
        return x.new_empty(x.shape), scale.new_empty(scale.shape)

    def modulate_setup(ctx, inputs, output):
        x, scale, eps = inputs
        ctx.save_for_backward(x, scale)
        ctx.eps = eps

    def modulate_backward(ctx, dy):
        x, scale = ctx.saved_tensors
        dx, dscale = modulate_bwd(dy, x, scale, ctx.eps)
        return dx, dscale, None

    modulate_fwd.register_autograd(modulate_backward, setup_context=modulate_setup)

    @torch.library.custom_op(f"lavin_fast::gated_rms_norm_residual_fwd_{kind}", mutates_args=())
    def gated_fwd(residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
        return _kernels(kind)[2](residual, h, gate, eps)

    @gated_fwd.register_fake
    def _(residual, h, gate, eps):
        return residual.new_empty(residual.shape)

    @torch.library.custom_op(f"lavin_fast::gated_rms_norm_residual_bwd_{kind}", mutates_args=())
    def gated_bwd(
        dout: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dh, s = _bwd_common(kind, _kernels(kind)[3], dout, h, gate, eps)
        t = torch.tanh(gate.float())
        return dh, (s * (1.0 - t * t)).to(gate.dtype)

    @gated_bwd.register_fake
    def _(dout, h, gate, eps):
        return h.new_empty(h.shape), gate.new_empty(gate.shape)

    def gated_setup(ctx, inputs, output):
        _residual, h, gate, eps = inputs
        ctx.save_for_backward(h, gate)
        ctx.eps = eps

    def gated_backward(ctx, dout):
        h, gate = ctx.saved_tensors
        dh, dgate = gated_bwd(dout, h, gate, ctx.eps)
        return dout, dh, dgate, None  # d(residual) = d(out): no copy

    gated_fwd.register_autograd(gated_backward, setup_context=gated_setup)
    return modulate_fwd, gated_fwd


_OPS = {kind: _register_ops(kind) for kind in ("triton", "cuda")}


# ----------------------------------------------------------------------------------------------
# 4. Dispatch and the public functions. Order cuda, triton, torch is provisional: the GPU
#    benchmark (bench/gpu_sandwich_norm.py) has not yet been run; reorder by its results.
# ----------------------------------------------------------------------------------------------
def _cuda_refusals(*tensors: torch.Tensor) -> list[str]:
    devices = sorted({t.device.type for t in tensors})
    if devices != ["cuda"]:
        return [f"tensors on {devices}; the CUDA C++ kernels need CUDA tensors"]
    from lavin_fast.ops import _cuda

    return _cuda.refusals(*tensors)


def _modulate_cuda(x, scale, eps):
    return _OPS["cuda"][0](x, scale, eps)


def _modulate_triton(x, scale, eps):
    return _OPS["triton"][0](x, scale, eps)


def _gated_cuda(residual, h, gate, eps):
    return _OPS["cuda"][1](residual, h, gate, eps)


def _gated_triton(residual, h, gate, eps):
    return _OPS["triton"][1](residual, h, gate, eps)


_modulate_dispatch = OpDispatcher(
    "rms_norm_modulate",
    [
        Backend("cuda", _modulate_cuda, lambda x, scale, eps: _cuda_refusals(x, scale)),
        Backend("triton", _modulate_triton, lambda x, scale, eps: triton_refusals(x, scale)),
        Backend("torch", reference_rms_norm_modulate),
    ],
)
_gated_dispatch = OpDispatcher(
    "gated_rms_norm_residual",
    [
        Backend("cuda", _gated_cuda, lambda r, h, g, eps: _cuda_refusals(r, h, g)),
        Backend("triton", _gated_triton, lambda r, h, g, eps: triton_refusals(r, h, g)),
        Backend("torch", reference_gated_rms_norm_residual),
    ],
)


def rms_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale): x [B, L, D], scale [B, D] (same dtype and device), no affine weight.

    Differentiable in x and scale. backend: "auto", "cuda", "triton" or "torch".
    """
    eps = check_modulate_inputs(x, scale, eps)
    return _modulate_dispatch(x, scale, eps, backend=backend)


def gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """residual + tanh(gate) * RMSNorm(h): residual, h [B, L, D], gate [B, D] (one dtype and device).

    Differentiable in residual, h and gate. backend: "auto", "cuda", "triton" or "torch".
    """
    eps = check_gated_inputs(residual, h, gate, eps)
    return _gated_dispatch(residual, h, gate, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: the J-DiT widths in bfloat16.
# ----------------------------------------------------------------------------------------------
@register_aot
def _aot_specs() -> list[AotSpec]:
    specs = []
    for D, what in ((512, "0.1B"), (1024, "1.0B"), (2304, "3.4B")):
        block_d, warps = next_power_of_2(D), min(16, max(1, next_power_of_2(D) // 256))
        const = {"BLOCK_D": block_d}
        label = f"{what} D={D} bf16"
        ints = {"L": "i32", "D": "i32"}
        cases = [
            ("rms_norm_modulate", _modulate_fwd_kernel,
             {"x_ptr": "*bf16", "scale_ptr": "*bf16", "y_ptr": "*bf16", **ints, "stride_xb": "i64",
              "stride_xl": "i64", "stride_sb": "i64", "eps": "fp32"}),
            ("rms_norm_modulate", _modulate_bwd_kernel,
             {"x_ptr": "*bf16", "scale_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "part_ptr": "*fp32",
              **ints, "G": "i32", "stride_xb": "i64", "stride_xl": "i64", "stride_sb": "i64", "stride_dyb": "i64",
              "stride_dyl": "i64", "eps": "fp32"}),
            ("gated_rms_norm_residual", _gated_fwd_kernel,
             {"res_ptr": "*bf16", "h_ptr": "*bf16", "gate_ptr": "*bf16", "out_ptr": "*bf16", **ints,
              "stride_rb": "i64", "stride_rl": "i64", "stride_hb": "i64", "stride_hl": "i64", "stride_gb": "i64",
              "eps": "fp32"}),
            ("gated_rms_norm_residual", _gated_bwd_kernel,
             {"h_ptr": "*bf16", "gate_ptr": "*bf16", "dout_ptr": "*bf16", "dh_ptr": "*bf16", "part_ptr": "*fp32",
              **ints, "G": "i32", "stride_hb": "i64", "stride_hl": "i64", "stride_gb": "i64", "stride_db": "i64",
              "stride_dl": "i64", "eps": "fp32"}),
        ]  # fmt: skip
        for op, kernel, sig in cases:
            aligned = tuple(k for k in sig if k.startswith("stride") or k == "D")
            specs.append(
                AotSpec(
                    op=op,
                    kernel=kernel,
                    signature={**sig, "BLOCK_D": "constexpr", **({"ROWS": "constexpr"} if "part_ptr" in sig else {})},
                    constexprs={**const, "ROWS": 16} if "part_ptr" in sig else const,
                    label=label,
                    num_warps=warps,
                    num_stages=1,
                    aligned=aligned,
                )
            )
    return specs
