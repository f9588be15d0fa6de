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

import functools

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
# 2. Triton kernels. Every kernel runs one program per group of consecutive tokens [l0, l1) of one
#    batch element, so that the per-sample vector (1 + scale, tanh(gate)) is loaded and computed
#    once per program, not once per token. Forward: row by row, the whole row in registers.
#    Backward: writes dx/dh per row and one float32 partial row of dscale/dgate per program;
#    `_vector_grad_kernel` sums the partial rows in a fixed order (deterministic, no atomics).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # exp of a non-positive argument: no overflow for any gate value
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load2(ptr, ca, ma, cb, mb):
    """A row as two float32 tiles: columns ca (the power-of-two head) and cb (the tail)."""
    a = tl.load(ptr + ca, mask=ma, other=0.0).to(tl.float32)
    b = tl.load(ptr + cb, mask=mb, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _store2(ptr, ca, ma, cb, mb, a, b):
    tl.store(ptr + ca, a.to(ptr.dtype.element_ty), mask=ma)
    tl.store(ptr + cb, b.to(ptr.dtype.element_ty), mask=mb)


@triton.jit
def _group_rows(L, G, RPG):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // G
    l0 = (pid - b * G) * RPG
    return pid, b, l0, tl.minimum(l0 + RPG, L)


@triton.jit
def _modulate_fwd_kernel(
    x_ptr, scale_ptr, y_ptr, L, D, G, RPG, stride_xb, stride_xl, stride_sb, eps, BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    _, b, l0, l1 = _group_rows(L, G, RPG)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ma = ca < D
    mb = cb < D
    sa, sb = _load2(scale_ptr + b * stride_sb, ca, ma, cb, mb)
    sa += 1.0
    sb += 1.0
    for l in range(l0, l1):
        xa, xb = _load2(x_ptr + b * stride_xb + l * stride_xl, ca, ma, cb, mb)
        rstd = tl.rsqrt((tl.sum(xa * xa, axis=0) + tl.sum(xb * xb, axis=0)) / D + eps)
        _store2(y_ptr + (b * L + l) * D, ca, ma, cb, mb, xa * rstd * sa, xb * rstd * sb)


@triton.jit
def _gated_fwd_kernel(
    res_ptr, h_ptr, gate_ptr, out_ptr, L, D, G, RPG, stride_rb, stride_rl, stride_hb, stride_hl, stride_gb, eps,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    _, b, l0, l1 = _group_rows(L, G, RPG)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ma = ca < D
    mb = cb < D
    ga, gb = _load2(gate_ptr + b * stride_gb, ca, ma, cb, mb)
    ta = _tanh(ga)
    tb = _tanh(gb)
    for l in range(l0, l1):
        ha, hb = _load2(h_ptr + b * stride_hb + l * stride_hl, ca, ma, cb, mb)
        # the residual is loaded before the row reduction: both rows in flight at once
        ra, rb = _load2(res_ptr + b * stride_rb + l * stride_rl, ca, ma, cb, mb)
        rstd = tl.rsqrt((tl.sum(ha * ha, axis=0) + tl.sum(hb * hb, axis=0)) / D + eps)
        _store2(out_ptr + (b * L + l) * D, ca, ma, cb, mb, ra + ta * (ha * rstd), rb + tb * (hb * rstd))


@triton.jit
def _norm_bwd_rows(
    x_ptr, dy_ptr, dx_ptr, part_ptr, pid, b, l0, l1, ka, kb, L, D, stride_xb, stride_xl, stride_dyb, stride_dyl,
    eps, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Shared backward body: for rows l0 .. l1-1, R at a time, with coef k (1 + scale or tanh(gate)),
    g = dy * k, dx = rstd * g - x * rstd^3 * sum(g * x) / D; writes sum over the rows of dy * n(x) to
    part[pid]. R rows in flight per program: fewer programs, so fewer partial rows, for the same bytes
    in flight per SM."""
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ma = (ca < D)[None, :]
    mb = (cb < D)[None, :]
    ka = ka[None, :]
    kb = kb[None, :]
    acc_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_B], dtype=tl.float32)
    for l in range(l0, l1, R):
        ls = l + tl.arange(0, R)
        rm = (ls < l1)[:, None]
        xo = b * stride_xb + ls[:, None] * stride_xl
        do = b * stride_dyb + ls[:, None] * stride_dyl
        xa = tl.load(x_ptr + xo + ca[None, :], mask=rm & ma, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + xo + cb[None, :], mask=rm & mb, other=0.0).to(tl.float32)
        da = tl.load(dy_ptr + do + ca[None, :], mask=rm & ma, other=0.0).to(tl.float32)
        db = tl.load(dy_ptr + do + cb[None, :], mask=rm & mb, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D + eps)[:, None]
        c = rstd * rstd * rstd * ((tl.sum(da * ka * xa, axis=1) + tl.sum(db * kb * xb, axis=1)) / D)[:, None]
        oo = (b * L + ls[:, None]) * D
        tl.store(dx_ptr + oo + ca[None, :], (rstd * (da * ka) - xa * c).to(dx_ptr.dtype.element_ty), mask=rm & ma)
        tl.store(dx_ptr + oo + cb[None, :], (rstd * (db * kb) - xb * c).to(dx_ptr.dtype.element_ty), mask=rm & mb)
        acc_a += tl.sum(da * (xa * rstd), axis=0)
        acc_b += tl.sum(db * (xb * rstd), axis=0)
    tl.store(part_ptr + pid * D + ca, acc_a, mask=ca < D)
    tl.store(part_ptr + pid * D + cb, acc_b, mask=cb < D)


@triton.jit
def _modulate_bwd_kernel(
    x_ptr, scale_ptr, dy_ptr, dx_ptr, part_ptr, L, D, G, RPG, stride_xb, stride_xl, stride_sb, stride_dyb,
    stride_dyl, eps, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    pid, b, l0, l1 = _group_rows(L, G, RPG)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    sa, sb = _load2(scale_ptr + b * stride_sb, ca, ca < D, cb, cb < D)
    _norm_bwd_rows(
        x_ptr, dy_ptr, dx_ptr, part_ptr, pid, b, l0, l1, 1.0 + sa, 1.0 + sb, L, D, stride_xb, stride_xl,
        stride_dyb, stride_dyl, eps, BLOCK_A, BLOCK_B, R,
    )  # fmt: skip


@triton.jit
def _gated_bwd_kernel(
    h_ptr, gate_ptr, dout_ptr, dh_ptr, part_ptr, L, D, G, RPG, stride_hb, stride_hl, stride_gb, stride_db,
    stride_dl, eps, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    pid, b, l0, l1 = _group_rows(L, G, RPG)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ga, gb = _load2(gate_ptr + b * stride_gb, ca, ca < D, cb, cb < D)
    _norm_bwd_rows(
        h_ptr, dout_ptr, dh_ptr, part_ptr, pid, b, l0, l1, _tanh(ga), _tanh(gb), L, D, stride_hb, stride_hl,
        stride_db, stride_dl, eps, BLOCK_A, BLOCK_B, R,
    )  # fmt: skip


@triton.jit
def _vector_grad_kernel(
    part_ptr, gate_ptr, out_ptr, G, D, stride_gb, GATED: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out[b] = sum over g of part[b, g] (times 1 - tanh(gate[b])^2 when GATED), cast to out's dtype:
    dscale / dgate in one launch; a fixed summation order, so bitwise reproducible."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < D
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        m = (gs[:, None] < G) & cmask[None, :]
        acc += tl.sum(tl.load(part_ptr + (b * G + gs[:, None]) * D + cols[None, :], mask=m, other=0.0), axis=0)
    if GATED:
        t = _tanh(tl.load(gate_ptr + b * stride_gb + cols, mask=cmask, other=0.0).to(tl.float32))
        acc = acc * (1.0 - t * t)
    tl.store(out_ptr + b * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


BWD_MIN_WARPS = 4  # a Triton backward program takes rows at once until it has this many warps


def bwd_rows_at_once(num_warps: int) -> int:
    """Rows in flight per Triton backward program (each with num_warps warps): narrow rows (D 512: 1
    warp) are taken 4 at once, so that every width runs ~4 programs of 4 warps per SM and writes the
    same number of partial rows (528 on 132 SMs) instead of 16 programs of 1 warp (17% more traffic at
    D 512, 16k tokens, instead of 4.3%)."""
    return max(1, BWD_MIN_WARPS // num_warps)


VECTORS_PER_THREAD = 2  # 16-byte vectors per thread in the row's power-of-two head tile
VECTOR_GRAD_BLOCK = (256, 8)  # (BLOCK_G, BLOCK_C) of _vector_grad_kernel: 8 KB of partials (32-byte rows) per step


def row_tiles(D: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): a row as a power-of-two head (the largest <= D) and a power-of-two tail
    covering the rest (1, masked off, when D is a power of two). D = 2304 is 2048 + 256 exactly, so no
    register holds a masked column (a single next_pow2 block, 4096, would waste 44% of them)."""
    head = 1 << (D.bit_length() - 1)
    return head, next_power_of_2(D - head) if D > head else 1


def tile_config(D: int, itemsize: int) -> tuple[int, int, int]:
    """(BLOCK_A, BLOCK_B, num_warps) on the GPU: the head tile gives every thread VECTORS_PER_THREAD
    16-byte vectors (bf16 D = 2304: 4 warps, 2 vectors of the head + 2 tail elements per thread;
    D = 3456 = 2048 + 1408 of a 2048 tail: 3 or 4 vectors per thread)."""
    head, tail = row_tiles(D)
    return head, tail, min(16, max(1, head // (32 * VECTORS_PER_THREAD * (16 // itemsize))))


def launch_config(D: int, itemsize: int) -> tuple[int, int, int]:
    """tile_config, with one warp under the interpreter (which ignores warps)."""
    head, tail, warps = tile_config(D, itemsize)
    return (head, tail, 1) if interpreter_active() else (head, tail, warps)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_resident(num_warps: int, backward: bool) -> int:
    """Programs per SM assumed before a kernel's registers are known: the forward holds one row
    (~64 registers at 4 warps: 8 programs), the backward x, dy, the coefficient and the column sums
    (~120 registers: 4 programs). The forward replaces it by the measured figure after its first
    launch; the backward keeps it (its split fixes the summation order of dscale/dgate)."""
    return max(1, (16 if backward else 32) // num_warps)


def rows_per_program(B: int, L: int, resident_per_sm: int, n_sm: int) -> int:
    """Consecutive tokens per program (one batch element each), for both backends: at most one wave
    of programs (n_sm x resident_per_sm), each looping over its tokens. The forward computes the
    per-sample vector (1 + scale, tanh(gate)) once per program; the backward writes one float32 partial
    row per program, so the partials are [programs, D] whatever the token count (D 2304 bf16, 132 SMs,
    4 per SM: 512 rows, 4.7 MB written and read back once: 4.2% of the 226 MB the backward moves at
    16k tokens, 1.7% at 40k)."""
    per_b = max(1, min(L, n_sm * max(1, resident_per_sm) // max(B, 1)))  # programs per batch element
    return max(1, -(-L // per_b))


_RESIDENT: dict[tuple, int] = {}  # (kernel, BLOCK_A, BLOCK_B, warps, dtype, device) -> programs per SM


def _resident_key(x: torch.Tensor, kernel) -> tuple:
    block_a, block_b, warps = launch_config(x.shape[-1], x.element_size())
    return (getattr(kernel, "__name__", None), block_a, block_b, warps, x.dtype, x.device)


def _program_rows(x: torch.Tensor, kernel, backward: bool, rows_at_once: int = 1) -> int:
    """Rows per program for x [B, L, D]. The forward uses the measured residency of its Triton kernel
    once known (the split does not change any result); the backward always the default, because its
    split fixes the order of the dscale/dgate sums: the same input gives the same bits on every call."""
    B, L, D = x.shape
    if interpreter_active() or not x.is_cuda:
        return max(1, -(-L // 2))  # two programs per batch element: multi-row groups, a ragged end
    warps = launch_config(D, x.element_size())[2] * rows_at_once
    per_sm = default_resident(warps, backward)
    if not backward:
        per_sm = _RESIDENT.get(_resident_key(x, kernel), per_sm)
    return rows_per_program(B, L, per_sm, _sm_count(x.device.index))


def _note_resident(key: tuple, compiled, warps: int) -> None:
    """Record the programs per SM of a launched kernel (from its registers and shared memory)."""
    if key in _RESIDENT or interpreter_active() or compiled is None:
        return
    try:
        regs, smem = int(compiled.n_regs), int(compiled.metadata.shared)
    except (AttributeError, TypeError, ValueError):  # another Triton: keep the default
        return
    if regs <= 0:
        return
    from lavin_fast.ops._hopper import occupancy

    _RESIDENT[key] = max(1, occupancy(regs, smem, warps)[0])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _triton_modulate_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    x, scale = _rows(x), _rows(scale)
    B, L, D = x.shape
    y = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_a, block_b, warps = launch_config(D, x.element_size())
    rpg = _program_rows(x, _modulate_fwd_kernel, backward=False)
    G = triton.cdiv(L, rpg)
    compiled = _modulate_fwd_kernel[(B * G,)](
        x,
        scale,
        y,
        L,
        D,
        G,
        rpg,
        x.stride(0),
        x.stride(1),
        scale.stride(0),
        eps,
        BLOCK_A=block_a,
        BLOCK_B=block_b,
        num_warps=warps,
    )
    _note_resident(_resident_key(x, _modulate_fwd_kernel), compiled, warps)
    return y


def _triton_gated_fwd(residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    residual, h, gate = _rows(residual), _rows(h), _rows(gate)
    B, L, D = h.shape
    out = torch.empty((B, L, D), dtype=residual.dtype, device=h.device)
    if out.numel() == 0:
        return out
    block_a, block_b, warps = launch_config(D, h.element_size())
    rpg = _program_rows(h, _gated_fwd_kernel, backward=False)
    G = triton.cdiv(L, rpg)
    compiled = _gated_fwd_kernel[(B * G,)](
        residual, h, gate, out, L, D, G, rpg, residual.stride(0), residual.stride(1), h.stride(0), h.stride(1),
        gate.stride(0), eps, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps,
    )  # fmt: skip
    _note_resident(_resident_key(h, _gated_fwd_kernel), compiled, warps)
    return out


def _triton_modulate_bwd(dy, x, scale, eps, rows):
    B, L, D = x.shape
    G = triton.cdiv(L, rows)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    part = torch.empty((B, G, D), dtype=torch.float32, device=x.device)
    block_a, block_b, warps = launch_config(D, x.element_size())
    _modulate_bwd_kernel[(B * G,)](
        x, scale, dy, dx, part, L, D, G, rows, x.stride(0), x.stride(1), scale.stride(0), dy.stride(0),
        dy.stride(1), eps, BLOCK_A=block_a, BLOCK_B=block_b, R=bwd_rows_at_once(warps), num_warps=warps * bwd_rows_at_once(warps),
    )  # fmt: skip
    return dx, part


def _triton_gated_bwd(dout, h, gate, eps, rows):
    B, L, D = h.shape
    G = triton.cdiv(L, rows)
    dh = torch.empty((B, L, D), dtype=h.dtype, device=h.device)
    part = torch.empty((B, G, D), dtype=torch.float32, device=h.device)
    block_a, block_b, warps = launch_config(D, h.element_size())
    _gated_bwd_kernel[(B * G,)](
        h, gate, dout, dh, part, L, D, G, rows, h.stride(0), h.stride(1), gate.stride(0), dout.stride(0),
        dout.stride(1), eps, BLOCK_A=block_a, BLOCK_B=block_b, R=bwd_rows_at_once(warps), num_warps=warps * bwd_rows_at_once(warps),
    )  # fmt: skip
    return dh, part


def vector_grad(part: torch.Tensor, vec: torch.Tensor, gated: bool) -> torch.Tensor:
    """dscale (= sum of the partial rows [B, G, D] over G) or dgate (times 1 - tanh(gate)^2), in vec's
    dtype: one Triton launch on the GPU (and under the interpreter), torch elsewhere."""
    B, G, D = part.shape
    if not (part.is_cuda or interpreter_active()):
        s = part.sum(1)
        if gated:
            t = torch.tanh(vec.float())
            s = s * (1.0 - t * t)
        return s.to(vec.dtype)
    out = torch.empty((B, D), dtype=vec.dtype, device=part.device)
    block_g, block_c = VECTOR_GRAD_BLOCK
    _vector_grad_kernel[(B, triton.cdiv(D, block_c))](
        part, vec, out, G, D, vec.stride(0), GATED=gated, BLOCK_G=block_g, BLOCK_C=block_c,
        num_warps=1 if interpreter_active() else 4,
    )  # fmt: skip
    return out


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
