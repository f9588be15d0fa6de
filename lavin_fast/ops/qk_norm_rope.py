"""QK RMSNorm + 3D RoPE in one pass: `qk_norm_rope` (and `rms_norm_rope` for one tensor).

The J-DiT normalises the projected q (and k) over the whole projected width H*hd with a learned
weight (eps 1e-6), splits into heads and applies the 3D RoPE (see rope.py). Unfused that is
4-6 passes over q and k (float32 upcast, norm, cast, cos/sin tables, rotate-half copies); the
kernel reads each row once (plus an L1/L2-resident re-read of the rotation partner column) and
writes the rotated, head-major [B, L, H, hd] rows the attention kernel reads.

Numerics: the reference follows the published code (norm in float32, cast to the input dtype,
times the weight, RoPE with cos/sin cast to the input dtype); the kernel keeps float32 from
load to store and rounds once, so it is at least as close to a float64 evaluation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lavin_fast.ops._checks import check_int, check_positive_float
from lavin_fast.ops._triton import next_power_of_2, triton_refusals
from lavin_fast.ops.aot import AotSpec, register_aot
from lavin_fast.ops.dispatch import Backend, OpDispatcher
from lavin_fast.ops.rope import apply_rope, check_grid, rope_inv_freq, rope_split
from lavin_fast.ops.sandwich_norm import rms_rstd

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_WIDTH = 8192  # H * hd: one row per program must fit in registers


# ----------------------------------------------------------------------------------------------
# 1. Reference (plain PyTorch): the numerical specification and the CPU path.
# ----------------------------------------------------------------------------------------------
def reference_rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    rope_grid: tuple[int, int, int] | None = None,
    eps: float = 1e-6,
    rope_t_offset: int = 0,
) -> torch.Tensor:
    """RMSNorm over the whole width H*hd of x [B, L, H, hd], times weight [H*hd], then 3D RoPE."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    normed = (xf * rms_rstd(xf, eps, (-2, -1))).to(x.dtype)
    y = normed * weight.to(x.dtype).view(x.shape[-2:])
    if rope_grid is not None:
        y = apply_rope(y, tuple(rope_grid), rope_t_offset)
    return y.contiguous()


def reference_qk_norm(
    qk: torch.Tensor, num_q_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The QK RMSNorm (no RoPE) of q = qk[:, :, :Hq] and k = qk[:, :, Hq:] in one pass over qk [B, L, Hq + Hkv, hd]
    (a view of the fused QKV projection is fine): each normalised over its own whole width with its own weight,
    as `reference_rms_norm_rope` does for each separately (the same operations in the same order). Returns a
    contiguous [B, L, Hq + Hkv, hd] tensor, so that RoPE can then rotate q and k in one pass too."""
    Hq = num_q_heads
    B, L, Hs, hd = qk.shape
    compute = torch.promote_types(qk.dtype, torch.float32)
    xf = qk.to(compute)
    rq = rms_rstd(xf[:, :, :Hq], eps, (-2, -1))  # [B, L, 1, 1] each
    rk = rms_rstd(xf[:, :, Hq:], eps, (-2, -1))
    rstd = torch.cat([rq.expand(B, L, Hq, 1), rk.expand(B, L, Hs - Hq, 1)], dim=2)  # [B, L, Hs, 1]: small
    weight = torch.cat([q_weight, k_weight]).to(qk.dtype).view(Hs, hd)
    return (xf * rstd).to(qk.dtype) * weight


def selected_backend(x: torch.Tensor, weight: torch.Tensor, backend: str | None = "auto") -> str:
    """The name of the backend `rms_norm_rope(x, weight, backend=backend)` would run on (no work is done)."""
    return _dispatch.select(backend, x, weight, None, 1e-6, 0).name


# ----------------------------------------------------------------------------------------------
# 2. Triton kernels. One program = BLOCK_L tokens x the whole row (all heads).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rope_columns(cols, HD: tl.constexpr, D_T: tl.constexpr, D_Y: tl.constexpr):
    """Per column: head-dim index, axis flags, rotation partner column and sign."""
    d = cols % HD
    in_y = d >= D_T
    in_x = d >= D_T + D_Y
    start = tl.where(in_x, D_T + D_Y, tl.where(in_y, D_T, 0))
    size = tl.where(in_x, HD - D_T - D_Y, tl.where(in_y, D_Y, D_T))
    half = size // 2
    second = (d - start) >= half
    partner = tl.where(second, cols - half, cols + half)
    # rotate-half: first half gets -v*sin, second half +u*sin
    sign = tl.where(second, 1.0, -1.0)
    return d, in_y, in_x, partner, sign


@triton.jit
def _rope_cos_sin(rows, d, in_y, in_x, cmask, inv_freq_ptr, GH, GW, t_offset):
    hw = GH * GW
    t = rows // hw + t_offset
    y = (rows // GW) % GH
    x = rows % GW
    pos = tl.where(in_x[None, :], x[:, None], tl.where(in_y[None, :], y[:, None], t[:, None])).to(tl.float32)
    freq = tl.load(inv_freq_ptr + d, mask=cmask, other=0.0)
    angle = pos * freq[None, :]  # float32, as the reference
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rms_norm_rope_fwd_kernel(
    x_ptr, w_ptr, inv_freq_ptr, out_ptr, rstd_ptr,
    L, stride_xb, stride_xl, GH, GW, t_offset, eps,
    WIDTH: tl.constexpr, HD: tl.constexpr, D_T: tl.constexpr, D_Y: tl.constexpr,
    HAS_ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < L
    cmask = cols < WIDTH
    mask = rmask[:, None] & cmask[None, :]
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + rows.to(tl.int64)[:, None] * stride_xl
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / WIDTH + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if HAS_ROPE:
        d, in_y, in_x, partner, sign = _rope_columns(cols, HD, D_T, D_Y)
        xp = tl.load(x_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        wp = tl.load(w_ptr + partner, mask=cmask, other=0.0).to(tl.float32)
        yp = xp * rstd[:, None] * wp[None, :]
        cos, sin = _rope_cos_sin(rows, d, in_y, in_x, cmask, inv_freq_ptr, GH, GW, t_offset)
        y = y * cos + sign[None, :] * yp * sin
    out_rows = out_ptr + (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * WIDTH
    tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + b * L + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_rope_bwd_kernel(
    dout_ptr, x_ptr, w_ptr, inv_freq_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    L, stride_xb, stride_xl, GH, GW, t_offset,
    WIDTH: tl.constexpr, HD: tl.constexpr, D_T: tl.constexpr, D_Y: tl.constexpr,
    HAS_ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < L
    cmask = cols < WIDTH
    mask = rmask[:, None] & cmask[None, :]
    dout_rows = dout_ptr + (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * WIDTH
    dn = tl.load(dout_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ROPE:
        # the inverse rotation: dn_u = g_u cos + g_v sin, dn_v = g_v cos - g_u sin
        d, in_y, in_x, partner, sign = _rope_columns(cols, HD, D_T, D_Y)
        gp = tl.load(dout_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        cos, sin = _rope_cos_sin(rows, d, in_y, in_x, cmask, inv_freq_ptr, GH, GW, t_offset)
        dn = dn * cos - sign[None, :] * gp * sin
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + rows.to(tl.int64)[:, None] * stride_xl
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + b * L + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = x * rstd[:, None]
    dy = dn * w[None, :]
    c = tl.sum(dy * y, axis=1) / WIDTH
    dx = rstd[:, None] * (dy - y * c[:, None])
    dx_rows = dx_ptr + (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * WIDTH
    tl.store(dx_rows + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    # per-program partial of dweight, summed on the host side in a fixed order (deterministic)
    part = b * tl.num_programs(0) + pid_l
    tl.store(dw_partial_ptr + part.to(tl.int64) * WIDTH + cols, tl.sum(dn * y, axis=0), mask=cmask)


def _launch_config(width: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_W, num_warps). Forward: ~4k elements per program, a warp per 256 of them.
    Backward holds more live values per element: ~2k elements on at most 8 warps (at 16 warps
    ptxas caps registers at 64 and spills; measured with `lavin-fast kernels --report`)."""
    block_w = next_power_of_2(width)
    if backward:
        block_l = max(1, min(16, 2048 // block_w))
        return block_l, block_w, 8
    block_l = max(1, min(16, 4096 // block_w))
    num_warps = max(4, min(16, block_l * block_w // 256))
    return block_l, block_w, num_warps


def _kernel_args(x: torch.Tensor, grid: list[int], t_offset: int):
    B, L, H, hd = x.shape
    has_rope = len(grid) == 3
    d_t, d_y, _ = rope_split(hd) if has_rope else (0, 0, 0)
    inv_freq = rope_inv_freq(hd, x.device) if has_rope else torch.zeros(1, device=x.device)
    gh, gw = (grid[1], grid[2]) if has_rope else (1, 1)
    return B, L, H * hd, hd, has_rope, d_t, d_y, inv_freq, gh, gw


def _triton_fwd(x, weight, grid, t_offset, eps):
    B, L, width, hd, has_rope, d_t, d_y, inv_freq, gh, gw = _kernel_args(x, grid, t_offset)
    out = torch.empty((B, L, x.shape[2], hd), dtype=x.dtype, device=x.device)
    rstd = torch.empty((B, L), dtype=torch.float32, device=x.device)
    block_l, block_w, num_warps = _launch_config(width)
    _rms_norm_rope_fwd_kernel[(triton.cdiv(L, block_l), B)](
        x, weight, inv_freq, out, rstd,
        L, x.stride(0), x.stride(1), gh, gw, t_offset, eps,
        WIDTH=width, HD=hd, D_T=d_t, D_Y=d_y, HAS_ROPE=has_rope,
        BLOCK_L=block_l, BLOCK_W=block_w, num_warps=num_warps,
    )  # fmt: skip
    return out, rstd


def _triton_bwd(dout, x, weight, rstd, grid, t_offset):
    B, L, width, hd, has_rope, d_t, d_y, inv_freq, gh, gw = _kernel_args(x, grid, t_offset)
    block_l, block_w, num_warps = _launch_config(width, backward=True)
    n_l = triton.cdiv(L, block_l)
    dx = torch.empty((B, L, x.shape[2], hd), dtype=x.dtype, device=x.device)
    dw_partial = torch.empty((B * n_l, width), dtype=torch.float32, device=x.device)
    _rms_norm_rope_bwd_kernel[(n_l, B)](
        dout, x, weight, inv_freq, rstd, dx, dw_partial,
        L, x.stride(0), x.stride(1), gh, gw, t_offset,
        WIDTH=width, HD=hd, D_T=d_t, D_Y=d_y, HAS_ROPE=has_rope,
        BLOCK_L=block_l, BLOCK_W=block_w, num_warps=num_warps,
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------
# 3. torch.library registration: one opaque op for torch.compile / FSDP / checkpointing.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lavin_fast::rms_norm_rope_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, weight: torch.Tensor, grid: list[int], t_offset: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_fwd(x, weight, grid, t_offset, eps)


@_fwd_op.register_fake
def _(x, weight, grid, t_offset, eps):
    B, L, H, hd = x.shape
    return x.new_empty((B, L, H, hd)), x.new_empty((B, L), dtype=torch.float32)


@torch.library.custom_op("lavin_fast::rms_norm_rope_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grid: list[int], t_offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_bwd(dout.contiguous(), x, weight, rstd, grid, t_offset)


@_bwd_op.register_fake
def _(dout, x, weight, rstd, grid, t_offset):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, grid, t_offset, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.grid, ctx.t_offset = grid, t_offset


def _backward(ctx, dout, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _bwd_op(dout, x, weight, rstd, ctx.grid, ctx.t_offset)
    return dx, dw, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# 4. Dispatch and the public functions.
# ----------------------------------------------------------------------------------------------
def _triton_impl(x, weight, rope_grid, eps, rope_t_offset):
    grid = list(rope_grid) if rope_grid is not None else []
    return _fwd_op(x, weight, grid, int(rope_t_offset), float(eps))[0]


def _triton_refusals(x, weight, rope_grid, eps, rope_t_offset) -> list[str]:
    reasons = triton_refusals(x, weight)
    if x.dtype == torch.float64:
        reasons.append("float64 is served by the torch reference only")
    width = x.shape[2] * x.shape[3]
    if width > MAX_WIDTH:
        reasons.append(f"row width H*hd = {width} exceeds the kernel's maximum {MAX_WIDTH}")
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        reasons.append(f"the last two dims of x must be contiguous (strides {tuple(x.stride())})")
    return reasons


_dispatch = OpDispatcher(
    "qk_norm_rope",
    [
        Backend("triton", _triton_impl, _triton_refusals),
        Backend("torch", reference_rms_norm_rope),
    ],
)


def _validate(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a [B, L, H, head_dim] tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; expected one of {_FLOAT_DTYPES}")
    if 0 in x.shape[:3]:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)} ([B, L, H, head_dim], each >= 1)")
    hd = x.shape[-1]
    if hd % 2 or hd > 256:
        raise ValueError(f"{name} head_dim {hd} is unsupported: it must be even and at most 256")
    width = x.shape[2] * hd
    if weight.dim() != 1 or weight.numel() != width:
        raise ValueError(f"{name}_weight must have shape [{width}] (= H*head_dim of {name}), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{name}_weight is on {weight.device} but {name} is on {x.device}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name}_weight must be floating point, got {weight.dtype}")


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    rope_grid: tuple[int, int, int] | None = None,
    *,
    eps: float = 1e-6,
    rope_t_offset: int = 0,
    backend: str | None = "auto",
) -> torch.Tensor:
    """RMSNorm of x [B, L, H, hd] over its whole width H*hd (learned weight [H*hd]) and, if
    rope_grid=(T, H', W') is given, the 3D RoPE with frame positions shifted by rope_t_offset.
    Returns a contiguous [B, L, H, hd] tensor in x's dtype."""
    _validate("x", x, weight)
    eps = check_positive_float("eps", eps)
    rope_t_offset = check_int("rope_t_offset", rope_t_offset)
    if rope_grid is not None:
        rope_grid = check_grid(rope_grid, x.shape[1])
        rope_split(x.shape[-1])  # raises for a head dim without an even 3D split
    return _dispatch(x, weight, rope_grid, eps, rope_t_offset, backend=backend)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope_grid: tuple[int, int, int] | None = None,
    *,
    eps: float = 1e-6,
    rope_t_offset: int = 0,
    backend: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The J-DiT's QK RMSNorm + 3D RoPE for one stream.

    q [B, L, Hq, hd] and k [B, L, Hkv, hd] (views of a fused projection are fine when the last
    two dims are contiguous); q_weight [Hq*hd], k_weight [Hkv*hd]. With rope_grid=(T, H, W)
    (T*H*W = L), token n gets position (n // (H*W) + rope_t_offset, (n // W) % H, n % W).
    Returns rotated q and k, contiguous [B, L, H, hd], in the layout `attention` reads.
    """
    _validate("q", q, q_weight)
    _validate("k", k, k_weight)
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, length and head_dim ([B, L, H, hd])"
        )
    eps = check_positive_float("eps", eps)
    rope_t_offset = check_int("rope_t_offset", rope_t_offset)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]})")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must share dtype and device")
    kw = dict(eps=eps, rope_t_offset=rope_t_offset, backend=backend)
    return rms_norm_rope(q, q_weight, rope_grid, **kw), rms_norm_rope(k, k_weight, rope_grid, **kw)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: the J-DiT widths (q and k of each model size, head dims 64/72/128).
# ----------------------------------------------------------------------------------------------
@register_aot
def _aot_specs() -> list[AotSpec]:
    specs = []
    common = {"L": "i32", "stride_xb": "i64", "stride_xl": "i32", "GH": "i32", "GW": "i32", "t_offset": "i32"}
    cases = [
        (2304, 72, "3.4B q"),
        (576, 72, "3.4B k"),
        (1024, 64, "1.0B q/k"),
        (512, 64, "0.1B q/k"),
        (4096, 128, "hd128 q"),
    ]
    for width, hd, what in cases:
        d_t, d_y, _ = rope_split(hd)
        label = f"{what} W={width} hd={hd} bf16"
        sig = {k: "constexpr" for k in ("WIDTH", "HD", "D_T", "D_Y", "HAS_ROPE", "BLOCK_L", "BLOCK_W")}
        fwd_sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "inv_freq_ptr": "*fp32", "out_ptr": "*bf16",
                   "rstd_ptr": "*fp32", **common, "eps": "fp32", **sig}  # fmt: skip
        bwd_sig = {"dout_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "inv_freq_ptr": "*fp32",
                   "rstd_ptr": "*fp32", "dx_ptr": "*bf16", "dw_partial_ptr": "*fp32", **common, **sig}  # fmt: skip
        for kernel, sig_, backward in (
            (_rms_norm_rope_fwd_kernel, fwd_sig, False),
            (_rms_norm_rope_bwd_kernel, bwd_sig, True),
        ):
            block_l, block_w, num_warps = _launch_config(width, backward)
            const = dict(WIDTH=width, HD=hd, D_T=d_t, D_Y=d_y, HAS_ROPE=True, BLOCK_L=block_l, BLOCK_W=block_w)
            # the grid and the HBM bytes at B 2 x L 8192 tokens (one row block per program, no loop): forward
            # reads x, writes out and rstd; backward reads dout, x and rstd, writes dx and its dw partial rows
            batch, tokens = 2, 8192
            n_l = -(-tokens // block_l)
            rows = batch * tokens
            moved = (
                (3 * rows * width * 2 + rows * 4 + batch * n_l * width * 4)
                if backward
                else (2 * rows * width * 2 + rows * 4)
            )
            specs.append(
                AotSpec(
                    op="qk_norm_rope",
                    kernel=kernel,
                    signature=sig_,
                    constexprs=const,
                    label=f"{label}, B2 x 8192 tokens",
                    num_warps=num_warps,
                    num_stages=1,
                    aligned=("stride_xb", "stride_xl"),
                    programs=batch * n_l,
                    useful_bytes=float(moved),
                )
            )
    return specs
