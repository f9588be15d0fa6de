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
        raise ValueError(f"{name} must be [B, D] = {(B, D)} to match {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}; cast it with .to()")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if D > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along D, got strides {tuple(t.stride())}")


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


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
# Dispatch and the public functions.
# ----------------------------------------------------------------------------------------------
_modulate_dispatch = OpDispatcher(
    "rms_norm_modulate",
    [Backend("torch", reference_rms_norm_modulate)],
)
_gated_dispatch = OpDispatcher(
    "gated_rms_norm_residual",
    [Backend("torch", reference_gated_rms_norm_residual)],
)


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm(x) * (1 + scale): x [B, L, D], scale [B, D] (same dtype and device), no affine weight.

    Differentiable in x and scale. backend: "auto", or one of the dispatcher's backend names.
    """
    eps = check_modulate_inputs(x, scale, eps)
    return _modulate_dispatch(x, scale, eps, backend=backend)


def gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """residual + tanh(gate) * RMSNorm(h): residual, h [B, L, D], gate [B, D] (one dtype and device).

    Differentiable in residual, h and gate. backend: "auto", or one of the dispatcher's backend names.
    """
    eps = check_gated_inputs(residual, h, gate, eps)
    return _gated_dispatch(residual, h, gate, eps, backend=backend)
