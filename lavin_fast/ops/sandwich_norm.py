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

from lavin_fast.ops import cpu_fused, torch_grads
from lavin_fast.ops._checks import check_positive_float
from lavin_fast.ops._triton import triton_refusals
from lavin_fast.ops.aot import AotSpec, register_aot
from lavin_fast.ops.dispatch import Backend, OpDispatcher, selection_is_explicit

# 2. The Triton kernels and their launchers live in sandwich_norm_kernels.py (re-exported here for the
#    tests, benchmarks and reports that read the launch configuration through this module).
from lavin_fast.ops.sandwich_norm_kernels import (  # noqa: F401
    BWD_MIN_WARPS,
    VECTOR_GRAD_BLOCK,
    VECTORS_PER_THREAD,
    _gated_bwd_kernel,
    _gated_fwd_kernel,
    _modulate_bwd_kernel,
    _modulate_fwd_kernel,
    _program_rows,
    _rows,
    _triton_gated_bwd,
    _triton_gated_fwd,
    _triton_modulate_bwd,
    _triton_modulate_fwd,
    _vector_grad_kernel,
    bwd_rows_at_once,
    default_resident,
    launch_config,
    row_tiles,
    rows_per_program,
    tile_config,
    vector_grad,
)
from lavin_fast.ops.torch_grads import compute_dtype, rms_rstd  # the references' dtype and statistic

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 16384  # widest row any backend supports (the models use 512 .. 2304)


# ----------------------------------------------------------------------------------------------
# 1. Reference (plain PyTorch): the numerical specification and the CPU path.
# ----------------------------------------------------------------------------------------------
def reference_rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale) for x [B, L, D], scale [B, D]; float32 math (float64 for float64)."""
    c = compute_dtype(x)
    xf = x.to(c)
    return (xf * rms_rstd(xf, eps) * (1 + scale.to(c)[:, None, :])).to(x.dtype)


def reference_gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """residual + tanh(gate) * RMSNorm(h) for residual, h [B, L, D], gate [B, D]; float32 math."""
    c = compute_dtype(h)
    hf = h.to(c)
    normed = hf * rms_rstd(hf, eps)
    return torch.addcmul(residual.to(c), torch.tanh(gate.to(c))[:, None, :], normed).to(residual.dtype)


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
# 3. torch.library registration, one op family per kernel backend ("triton", "cuda"), so that
#    torch.compile / FSDP / activation checkpointing see one opaque op per call.
# ----------------------------------------------------------------------------------------------
def _bwd_common(kind: str, fn, dy: torch.Tensor, x: torch.Tensor, vec: torch.Tensor, eps: float, gated: bool):
    """Run a backward launcher; returns (dx, dscale or dgate in vec's dtype)."""
    dy, x, vec = _rows(dy), _rows(x), _rows(vec)
    if x.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(vec)
    # the CUDA backward: one row per row group (of 96-160 threads at D 2304)
    at_once = bwd_rows_at_once(launch_config(x.shape[-1], x.element_size())[2]) if kind == "triton" else 1
    dx, part = fn(dy, x, vec, eps, _program_rows(x, None, backward=True, rows_at_once=at_once))
    return dx, vector_grad(part, vec, gated)


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
        return _bwd_common(kind, _kernels(kind)[1], dy, x, scale, eps, gated=False)

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
        return _bwd_common(kind, _kernels(kind)[3], dout, h, gate, eps, gated=True)

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
# 4. Dispatch and the public functions. `auto` takes Triton, then torch: the Triton kernels are
#    checked against the reference by the interpreter on every CI run, while the CUDA C++ library has
#    never run anywhere (no GPU yet), so it is used only when asked for by name (`backend="cuda"` or
#    LAVIN_FAST_BACKEND=cuda). Revisit after a GPU run of tests/test_sandwich_norm.py and
#    bench/gpu_sandwich_norm.py.
# ----------------------------------------------------------------------------------------------
CUDA_BY_NAME_ONLY = "auto never picks the CUDA C++ library (never run on a GPU yet); ask for backend='cuda' by name"


def _cuda_refusals(*tensors: torch.Tensor) -> list[str]:
    if not selection_is_explicit():
        return [CUDA_BY_NAME_ONLY]
    return _cuda_library_refusals(*tensors)


def _cuda_library_refusals(*tensors: torch.Tensor) -> list[str]:
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
        Backend("triton", _modulate_triton, lambda x, scale, eps: triton_refusals(x, scale)),
        Backend("cuda", _modulate_cuda, lambda x, scale, eps: _cuda_refusals(x, scale)),
        Backend("cpu", cpu_fused.rms_norm_modulate, cpu_fused.modulate_refusals),  # C++, one pass each way
        Backend("torch", torch_grads.rms_norm_modulate),  # the reference's forward, a hand-written backward
    ],
)
_gated_dispatch = OpDispatcher(
    "gated_rms_norm_residual",
    [
        Backend("triton", _gated_triton, lambda r, h, g, eps: triton_refusals(r, h, g)),
        Backend("cuda", _gated_cuda, lambda r, h, g, eps: _cuda_refusals(r, h, g)),
        Backend("cpu", cpu_fused.gated_rms_norm_residual, cpu_fused.gated_refusals),
        Backend("torch", torch_grads.gated_rms_norm_residual),  # likewise
    ],
)


def rms_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """RMSNorm(x) * (1 + scale): x [B, L, D], scale [B, D] (same dtype and device), no affine weight.

    Differentiable in x and scale. backend: "auto" (Triton on CUDA tensors, the C++ "cpu" kernels on float32 CPU
    tensors, else torch), "triton", "cpu", "cuda" (by name only) or "torch".
    """
    eps = check_modulate_inputs(x, scale, eps)
    return _modulate_dispatch(x, scale, eps, backend=backend)


def gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """residual + tanh(gate) * RMSNorm(h): residual, h [B, L, D], gate [B, D] (one dtype and device).

    Differentiable in residual, h and gate. backend: "auto" (Triton on CUDA tensors, the C++ "cpu" kernels on
    float32 CPU tensors, else torch), "triton", "cpu", "cuda" (by name only) or "torch".
    """
    eps = check_gated_inputs(residual, h, gate, eps)
    return _gated_dispatch(residual, h, gate, eps, backend=backend)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: the J-DiT widths in bfloat16.
# ----------------------------------------------------------------------------------------------
AOT_TOKENS = (2, 8192)  # (B, L): the static estimates stand for 16k tokens
AOT_SMS = 132  # H100 / H200
MIN_BYTES_PER_ELEMENT = {  # minimum HBM traffic per [B, L, D] element, in elements (see the module doc)
    (_modulate_fwd_kernel, False): 2, (_gated_fwd_kernel, False): 3,
    (_modulate_bwd_kernel, True): 3, (_gated_bwd_kernel, True): 3,
}  # fmt: skip


@register_aot
def _aot_specs() -> list[AotSpec]:
    specs = []
    B, L = AOT_TOKENS
    ints = {"L": "i32", "D": "i32", "G": "i32", "RPG": "i32"}
    for D, what in ((512, "0.1B"), (1024, "1.0B"), (2304, "3.4B"), (3456, "no J-DiT width,")):
        block_a, block_b, warps = tile_config(D, 2)
        cases = [
            ("rms_norm_modulate", _modulate_fwd_kernel,
             {"x_ptr": "*bf16", "scale_ptr": "*bf16", "y_ptr": "*bf16", **ints, "stride_xb": "i64",
              "stride_xl": "i64", "stride_sb": "i64", "eps": "fp32"}),
            ("rms_norm_modulate", _modulate_bwd_kernel,
             {"x_ptr": "*bf16", "scale_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "part_ptr": "*fp32",
              **ints, "stride_xb": "i64", "stride_xl": "i64", "stride_sb": "i64", "stride_dyb": "i64",
              "stride_dyl": "i64", "eps": "fp32"}),
            ("gated_rms_norm_residual", _gated_fwd_kernel,
             {"res_ptr": "*bf16", "h_ptr": "*bf16", "gate_ptr": "*bf16", "out_ptr": "*bf16", **ints,
              "stride_rb": "i64", "stride_rl": "i64", "stride_hb": "i64", "stride_hl": "i64", "stride_gb": "i64",
              "eps": "fp32"}),
            ("gated_rms_norm_residual", _gated_bwd_kernel,
             {"h_ptr": "*bf16", "gate_ptr": "*bf16", "dout_ptr": "*bf16", "dh_ptr": "*bf16", "part_ptr": "*fp32",
              **ints, "stride_hb": "i64", "stride_hl": "i64", "stride_gb": "i64", "stride_db": "i64",
              "stride_dl": "i64", "eps": "fp32"}),
        ]  # fmt: skip
        for op, kernel, sig in cases:
            backward = "part_ptr" in sig
            at_once = bwd_rows_at_once(warps) if backward else 1
            rows = rows_per_program(B, L, default_resident(warps * at_once, backward), AOT_SMS)
            aligned = tuple(k for k in sig if k.startswith("stride") or k == "D")
            specs.append(
                AotSpec(
                    op=op,
                    kernel=kernel,
                    signature={
                        **sig,
                        "BLOCK_A": "constexpr",
                        "BLOCK_B": "constexpr",
                        **({"R": "constexpr"} if backward else {}),
                    },
                    constexprs={"BLOCK_A": block_a, "BLOCK_B": block_b, **({"R": at_once} if backward else {})},
                    label=f"{what} D={D} bf16, {B * L // 1024}k tokens, {rows} rows/program"
                    + (f", {at_once} at once" if backward else ""),
                    num_warps=warps * at_once,
                    num_stages=1,
                    aligned=aligned,
                    programs=B * -(-L // rows),
                    iters_per_program=-(-rows // at_once),
                    useful_bytes=MIN_BYTES_PER_ELEMENT[(kernel, backward)] * B * L * D * 2,
                )
            )
    block_g, block_c = VECTOR_GRAD_BLOCK
    D = 2304
    warps = tile_config(D, 2)[2]
    G = -(-L // rows_per_program(B, L, default_resident(warps * bwd_rows_at_once(warps), True), AOT_SMS))
    for op, gated in (("rms_norm_modulate", False), ("gated_rms_norm_residual", True)):
        specs.append(
            AotSpec(
                op=op,
                kernel=_vector_grad_kernel,
                signature={
                    "part_ptr": "*fp32",
                    "gate_ptr": "*bf16",
                    "out_ptr": "*bf16",
                    "G": "i32",
                    "D": "i32",
                    "stride_gb": "i64",
                    "GATED": "constexpr",
                    "BLOCK_G": "constexpr",
                    "BLOCK_C": "constexpr",
                },  # fmt: skip
                constexprs={"GATED": gated, "BLOCK_G": block_g, "BLOCK_C": block_c},
                label=f"d{'gate' if gated else 'scale'}: {G} partial rows per sample, D={D}, B={B}",
                num_warps=4,
                num_stages=1,
                aligned=("D", "stride_gb"),
                programs=B * -(-D // block_c),
                iters_per_program=-(-G // block_g),
                useful_bytes=B * G * D * 4,  # the partial rows, read once
            )
        )
    return specs
