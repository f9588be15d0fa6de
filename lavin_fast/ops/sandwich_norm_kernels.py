"""Triton kernels of the sandwich norm (ops/sandwich_norm.py) and their launchers: forward and backward of
`rms_norm_modulate` and `gated_rms_norm_residual`, the deterministic dscale / dgate reduction, and the launch
configuration (row tiles, warps, rows per program from the programs resident per SM)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lavin_fast.ops._triton import interpreter_active, next_power_of_2


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
