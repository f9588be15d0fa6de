"""Device helpers shared by the Triton attention kernels (lavin_fast.ops.attention_fwd_kernels,
lavin_fast.ops.attention_bwd_kernels): stride scaling, RoPE columns and angles, masked and rotated
tile loads, and the per-head TMA descriptors.

Strides are passed in units of 8 elements (see `_al`) so that hd-72 rows are provably 16-byte aligned.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from lavin_fast.ops._triton import interpreter_active

# resolution); the interpreter has no libdevice, so it takes tl.cos / tl.sin
_FAST_TRIG = tl.constexpr(not interpreter_active())
# TMA bulk reductions (descriptor atomic_add) on the GPU; Triton 3.6's interpreter lacks them
_TMA_REDUCE = tl.constexpr(not interpreter_active())
TAIL = 16  # width of the head-dim tail tile (hd 72 = 64 + 8 valid of 16)


def head_dim_tiles(hd: int) -> tuple[int, bool]:
    """(main tile width D0, whether a 16-wide tail tile follows) for a supported head dim."""
    if hd == 64:
        return 64, False
    if hd == 72:
        return 64, True
    if hd == 128:
        return 128, False
    raise ValueError(f"head_dim {hd} has no Triton tiling (supported: 64, 72, 128)")


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _al(offset):
    """Strides arrive in units of 8 elements (the launcher divides them): multiplying back by the
    constant 8 lets Triton prove 16-byte alignment and load 16-byte vectors even when the head
    stride is 72 (tl.multiple_of hints on scalars do not survive to the load)."""
    return offset * 8


@triton.jit
def _rope_cols(cols, HD: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr):
    """Per column: rotate-half partner column, sign of the partner term, RoPE axis (0 t, 1 y, 2 x)."""
    in0 = cols < C0
    in1 = (cols >= C0) & (cols < C1)
    start = tl.where(in0, 0, tl.where(in1, C0, C1))
    half = tl.where(in0, C0, tl.where(in1, C1 - C0, HD - C1)) // 2
    first = (cols - start) < half
    partner = tl.where(first, cols + half, cols - half)
    sign = tl.where(first, -1.0, 1.0)
    axis = tl.where(in0, 0, tl.where(in1, 1, 2))
    return partner, sign, axis


@triton.jit
def _rope_cos_sin(rows, cols, axis, INV_FREQ, GH, GW, T_OFF, HD: tl.constexpr):
    """cos, sin [R, C] float32 of the 3D RoPE angle for tokens `rows` and head-dim columns `cols`."""
    hw = GH * GW
    t = (rows // hw + T_OFF).to(tl.float32)
    y = ((rows // GW) % GH).to(tl.float32)
    x = (rows % GW).to(tl.float32)
    f = tl.load(INV_FREQ + cols, mask=cols < HD, other=0.0)
    ax = axis[None, :]
    pos = tl.where(ax == 0, t[:, None], tl.where(ax == 1, y[:, None], x[:, None]))
    ang = pos * f[None, :]
    if _FAST_TRIG:  # one MUFU op each and no local-memory range reduction; |angle| < a few hundred
        return libdevice.fast_cosf(ang), libdevice.fast_sinf(ang)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _load(base, rows, row_stride, cols, rmask, HD: tl.constexpr, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    ptrs = base + rows[:, None] * _al(row_stride) + cols[None, :]
    if ROW_MASK:
        if COL_MASK:
            return tl.load(ptrs, mask=rmask[:, None] & (cols[None, :] < HD), other=0.0)
        return tl.load(ptrs, mask=rmask[:, None], other=0.0)
    if COL_MASK:
        return tl.load(ptrs, mask=cols[None, :] < HD, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_rot(
    base, rows, row_stride, cols, rmask, INV_FREQ, GH, GW, T_OFF,
    HD: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
    ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr, ROPE: tl.constexpr,
):
    """Load a [R, C] tile, rotated by the 3D RoPE if ROPE (in float32, rounded once to the dtype)."""
    x = _load(base, rows, row_stride, cols, rmask, HD, ROW_MASK, COL_MASK)
    if ROPE:
        partner, sign, axis = _rope_cols(cols, HD, C0, C1)
        # partner columns always lie inside [0, HD): mask only the padding columns / rows
        xp = _load(base, rows, row_stride, partner, rmask, HD, ROW_MASK, COL_MASK)
        c, s = _rope_cos_sin(rows, cols, axis, INV_FREQ, GH, GW, T_OFF, HD)
        x = (x.to(tl.float32) * c + xp.to(tl.float32) * (sign[None, :] * s)).to(x.dtype)
    return x


@triton.jit
def _head_desc(base, L, row_stride, HD: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    return tl.make_tensor_descriptor(base, shape=[L, HD], strides=[_al(row_stride), 1], block_shape=[BLOCK, WIDTH])


@triton.jit
def _heads_desc(base, L, H, row_stride, head_stride, HD: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    return tl.make_tensor_descriptor(
        base, shape=[L, H, HD], strides=[_al(row_stride), _al(head_stride), 1], block_shape=[BLOCK, 1, WIDTH]
    )


@triton.jit
def _store_kv_tails(
    k_base, v_base, t_base, rows, rmask, skl, svl, stl, c, HD: tl.constexpr, D0: tl.constexpr, WITH_K: tl.constexpr,
):
    """Rows `rows` of one head's k / v tail tiles (`v_tail`, `kv_tails` in the launcher are the specification).
    WITH_K=False, [., 16]: v's columns D0..HD-1, a one at column HD - D0, zeros. WITH_K=True, [., 32]: k's columns
    D0..HD-1 with c at columns 8..10, then v's with ones at 24..26, zeros elsewhere. Columns >= HD of k and v are
    never read (masked), so at hd 64 the tiles hold only the constants."""
    cols = tl.arange(0, 16)
    vt = _load(v_base, rows, svl, D0 + cols, rmask, HD, True, True).to(tl.float32)
    t_ptrs = t_base + rows[:, None] * _al(stl) + cols[None, :]
    dt: tl.constexpr = t_base.dtype.element_ty
    if WITH_K:
        stat = ((cols >= 8) & (cols < 11))[None, :]
        kt = _load(k_base, rows, skl, D0 + cols, rmask, HD, True, True).to(tl.float32)
        tl.store(t_ptrs, tl.where(stat, c, kt).to(dt), mask=rmask[:, None])
        tl.store(t_ptrs + 16, tl.where(stat, 1.0, vt).to(dt), mask=rmask[:, None])
    else:
        tl.store(t_ptrs, tl.where((cols == HD - D0)[None, :], 1.0, vt).to(dt), mask=rmask[:, None])
