"""Triton flash attention (forward and backward) for the J-DiT's joint attention, with the 3D RoPE
either already applied to q/k (the default path) or applied inside the kernels (opt-in).

Design (docs/attention.md has the reasoning and the static estimates):
- Layout [B, L, H, hd] with arbitrary batch/token/head strides (last dim contiguous).
- Head dim in two column tiles: a main tile of D0 = 64 (hd 64, 72) or 128 (hd 128) columns, and
  for hd 72 a 16-wide tail tile (columns 64..79, zero past 72). Every matmul is done per tile, so
  hd 72 costs 80 columns of tensor-core work instead of 128 (or flash-attn's 96).
- Default path (pre-rotated q/k): `attn_fwd_tma_kernel` and `attn_bwd_dkdv_tma_kernel` load through
  TMA descriptors made in the kernel, one per (batch, head) over [L, hd]: columns >= hd and rows >= L
  read as zeros. The forward skips the accumulator rescale unless a row max grows by more than
  RESCALE_SLACK; the dK/dV kernel also computes dQ (5 matmuls) by TMA bulk reductions.
- Forward: FA2 online softmax in base 2 (the softmax scale times log2(e) folded into one FMA before
  exp2); the row logsumexp (base 2, of the scaled logits) is saved for the backward.
- In-kernel RoPE (`attn_fwd_kernel`, `attn_bwd_dkdv_kernel`, `attn_bwd_dq_kernel`, pointer loads): a
  tile of q or k is rotated right after loading, in float32, by loading it a second time at the
  rotate-half partner columns; gradients go back through the rotation (R^T) in a small epilogue.
- Backward: delta = rowsum(dO * O); one program per (kv block, kv head) walks the query blocks of
  every query head of its group, so dK and dV for a kv head are summed in registers; dQ fused
  (default) or, with deterministic=True, by a separate dQ kernel with a fixed summation order.
- Launch configurations: the first entry of each list, chosen by the static sm_90 report; Triton's
  autotuner over the list only with LAVIN_FAST_ATTENTION_TUNE=1 (cached on disk, logged).
- Strides are passed in units of 8 elements (see `_al`) so that hd-72 rows are provably 16-byte aligned.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from lavin_fast.ops._triton import interpreter_active, use_tma_scratch
from lavin_fast.ops.rope import rope_inv_freq, rope_split

LOG2E = 1.4426950408889634
# hardware sin/cos approximations on the GPU (accurate to ~1e-6 absolute at our angles, far below bf16/fp16
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


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc_a, acc_b, m_i, l_i, qa, qb, k_base, v_base, skl, svl, start, end, L, qk_scale,
    INV_FREQ, GH, GW, T_OFF,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
):
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    for start_n in range(start, end, BLOCK_N):
        rows_n = start_n + tl.arange(0, BLOCK_N)
        nmask = rows_n < L
        ka = _load_rot(k_base, rows_n, skl, cols_a, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, False, ROPE)
        s = tl.dot(qa, tl.trans(ka))
        if HAS_TAIL:
            kb = _load_rot(k_base, rows_n, skl, cols_b, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, True, ROPE)
            s = tl.dot(qb, tl.trans(kb), s)
        if MASK:
            s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(qa.dtype)
        va = _load(v_base, rows_n, svl, cols_a, nmask, HD, MASK, False)
        acc_a = tl.dot(p, va, acc_a * alpha[:, None])
        if HAS_TAIL:
            vb = _load(v_base, rows_n, svl, cols_b, nmask, HD, MASK, True)
            acc_b = tl.dot(p, vb, acc_b * alpha[:, None])
        m_i = m_new
    return acc_a, acc_b, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, INV_FREQ,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    L, HQ, GROUP, GH, GW, T_OFF, qk_scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + _al(b * sqb + h * sqh)
    k_base = K + _al(b * skb + hk * skh)
    v_base = V + _al(b * svb + hk * svh)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows_m < L
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    qa = _load_rot(q_base, rows_m, sql, cols_a, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, False, ROPE)
    qb = tl.zeros([BLOCK_M, 16], dtype=qa.dtype)
    if HAS_TAIL:
        qb = _load_rot(q_base, rows_m, sql, cols_b, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, True, ROPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    l_full = (L // BLOCK_N) * BLOCK_N
    acc_a, acc_b, m_i, l_i = _fwd_inner(
        acc_a, acc_b, m_i, l_i, qa, qb, k_base, v_base, skl, svl, 0, l_full, L, qk_scale, INV_FREQ, GH, GW, T_OFF,
        HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_N, False,
    )
    if l_full < L:  # the last, partial block of keys
        acc_a, acc_b, m_i, l_i = _fwd_inner(
            acc_a, acc_b, m_i, l_i, qa, qb, k_base, v_base, skl, svl, l_full, L, L, qk_scale, INV_FREQ, GH, GW,
            T_OFF, HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_N, True,
        )
    inv_l = 1.0 / l_i
    o_base = O + _al(b * sob + h * soh)
    o_ptrs = o_base + rows_m[:, None] * _al(sol) + cols_a[None, :]
    tl.store(o_ptrs, (acc_a * inv_l[:, None]).to(O.dtype.element_ty), mask=mmask[:, None])
    if HAS_TAIL:
        o_ptrs = o_base + rows_m[:, None] * _al(sol) + cols_b[None, :]
        tl.store(o_ptrs, (acc_b * inv_l[:, None]).to(O.dtype.element_ty), mask=mmask[:, None] & (cols_b[None, :] < HD))
    tl.store(LSE + bh.to(tl.int64) * L + rows_m, m_i + tl.math.log2(l_i), mask=mmask)


# Forward on pre-rotated q/k (the default): TMA tensor descriptors made in the kernel, one per
# (batch, head) over [L, HD] with row stride = the token stride. Columns >= HD and rows >= L read
# as zeros, so the hd-72 tail tile (columns 64..79) can never see the next head's columns (an Inf
# there times a zero q column would be NaN), and the last, partial key block needs no load masks.
@triton.jit
def _fwd_tma_scores(qa, qb, ka_desc, kb_desc, start_n, D0: tl.constexpr, HAS_TAIL: tl.constexpr):
    """Logits S = Q K^T of one key block (main tile, then the 16-wide tail, one accumulator)."""
    s = tl.dot(qa, tl.trans(ka_desc.load([start_n, 0])))
    if HAS_TAIL:
        s = tl.dot(qb, tl.trans(kb_desc.load([start_n, D0])), s)
    return s


@triton.jit
def _fwd_tma_update(
    s, acc_a, acc_b, m_i, l_i, va_desc, vb_desc, start_n, L, qk_scale, dtype: tl.constexpr,
    D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    RESCALE_SLACK: tl.constexpr,
):
    """Online softmax of one key block's logits and the P V products."""
    if MASK:
        s = tl.where((start_n + tl.arange(0, BLOCK_N) < L)[None, :], s, float("-inf"))
    m_blk = tl.max(s, 1) * qk_scale
    # the running max moves only when a row's block max exceeds it by more than RESCALE_SLACK
    # (log2 units): p <= 2**RESCALE_SLACK stays exact in float32 and the accumulator rescale
    # (a multiply per accumulator element) is skipped on almost every iteration after the first
    if tl.max(m_blk - m_i, 0) > RESCALE_SLACK:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_a = acc_a * alpha[:, None]
        if HAS_TAIL:
            acc_b = acc_b * alpha[:, None]
        m_i = m_new
    p = tl.math.exp2(s * qk_scale - m_i[:, None])
    l_i += tl.sum(p, 1)
    p = p.to(dtype)
    acc_a = tl.dot(p, va_desc.load([start_n, 0]), acc_a)
    if HAS_TAIL:
        acc_b = tl.dot(p, vb_desc.load([start_n, D0]), acc_b)
    return acc_a, acc_b, m_i, l_i


@triton.jit
def _head_desc(base, L, row_stride, HD: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    return tl.make_tensor_descriptor(base, shape=[L, HD], strides=[_al(row_stride), 1], block_shape=[BLOCK, WIDTH])


@triton.jit
def _heads_desc(base, L, H, row_stride, head_stride, HD: tl.constexpr, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    return tl.make_tensor_descriptor(
        base, shape=[L, H, HD], strides=[_al(row_stride), _al(head_stride), 1], block_shape=[BLOCK, 1, WIDTH]
    )


@triton.jit
def attn_fwd_tma_kernel(
    Q, K, V, O, LSE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
    L, HQ, GROUP, qk_scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, RESCALE_SLACK: tl.constexpr,
):
    """Forward of one query block of one (batch, query head) on q/k already rotated (or no RoPE)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    q_base = Q + _al(b * sqb + h * sqh)
    k_base = K + _al(b * skb + hk * skh)
    v_base = V + _al(b * svb + hk * svh)
    start_m = pid_m * BLOCK_M
    qa = _head_desc(q_base, L, sql, HD, BLOCK_M, D0).load([start_m, 0])
    qb = tl.zeros([BLOCK_M, 16], dtype=qa.dtype)
    ka_desc = _head_desc(k_base, L, skl, HD, BLOCK_N, D0)
    va_desc = _head_desc(v_base, L, svl, HD, BLOCK_N, D0)
    kb_desc = ka_desc
    vb_desc = va_desc
    if HAS_TAIL:
        qb = _head_desc(q_base, L, sql, HD, BLOCK_M, 16).load([start_m, D0])
        kb_desc = _head_desc(k_base, L, skl, HD, BLOCK_N, 16)
        vb_desc = _head_desc(v_base, L, svl, HD, BLOCK_N, 16)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    l_full = (L // BLOCK_N) * BLOCK_N
    dt: tl.constexpr = qa.dtype
    for start_n in tl.range(0, l_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        s = _fwd_tma_scores(qa, qb, ka_desc, kb_desc, start_n, D0, HAS_TAIL)
        acc_a, acc_b, m_i, l_i = _fwd_tma_update(
            s, acc_a, acc_b, m_i, l_i, va_desc, vb_desc, start_n, L, qk_scale, dt,
            D0, HAS_TAIL, BLOCK_N, False, RESCALE_SLACK,
        )
    if l_full < L:  # the last, partial block of keys, once (rows >= L read as zeros; their logits masked)
        s = _fwd_tma_scores(qa, qb, ka_desc, kb_desc, l_full, D0, HAS_TAIL)
        acc_a, acc_b, m_i, l_i = _fwd_tma_update(
            s, acc_a, acc_b, m_i, l_i, va_desc, vb_desc, l_full, L, qk_scale, dt, D0, HAS_TAIL, BLOCK_N, True,
            RESCALE_SLACK,
        )
    inv_l = 1.0 / l_i
    rows_m = start_m + tl.arange(0, BLOCK_M)
    mmask = rows_m < L
    cols_a = tl.arange(0, D0)
    o_base = O + _al(b * sob + h * soh)
    o_ptrs = o_base + rows_m[:, None] * _al(sol) + cols_a[None, :]
    tl.store(o_ptrs, (acc_a * inv_l[:, None]).to(O.dtype.element_ty), mask=mmask[:, None])
    if HAS_TAIL:
        cols_b = D0 + tl.arange(0, 16)
        o_ptrs = o_base + rows_m[:, None] * _al(sol) + cols_b[None, :]
        tl.store(o_ptrs, (acc_b * inv_l[:, None]).to(O.dtype.element_ty), mask=mmask[:, None] & (cols_b[None, :] < HD))
    tl.store(LSE + bh.to(tl.int64) * L + rows_m, m_i + tl.math.log2(l_i), mask=mmask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def attn_bwd_pre_kernel(
    O, DO, DELTA, sob, sol, soh, sdb, sdl, sdh, L, HQ,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, l] = sum_d O * dO (float32)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    cols_a = tl.arange(0, D0)
    o = _load(O + _al(b * sob + h * soh), rows, sol, cols_a, rmask, HD, True, False).to(tl.float32)
    do = _load(DO + _al(b * sdb + h * sdh), rows, sdl, cols_a, rmask, HD, True, False).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_TAIL:
        cols_b = D0 + tl.arange(0, 16)
        o = _load(O + _al(b * sob + h * soh), rows, sol, cols_b, rmask, HD, True, True).to(tl.float32)
        do = _load(DO + _al(b * sdb + h * sdh), rows, sdl, cols_b, rmask, HD, True, True).to(tl.float32)
        delta += tl.sum(o * do, 1)
    tl.store(DELTA + bh.to(tl.int64) * L + rows, delta, mask=rmask)


@triton.jit
def _dkdv_inner(
    dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_base, do_base, lse_base, delta_base, dq_base,
    sql, sdl, sacc_l, start, end, L, qk_scale, INV_FREQ, GH, GW, T_OFF,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    for start_m in range(start, end, BLOCK_M):
        rows_m = start_m + tl.arange(0, BLOCK_M)
        mmask = rows_m < L
        qa = _load_rot(q_base, rows_m, sql, cols_a, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, False, ROPE)
        doa = _load(do_base, rows_m, sdl, cols_a, mmask, HD, MASK, False)
        if MASK:  # lse = +inf on missing rows makes their probabilities 0
            lse = tl.load(lse_base + rows_m, mask=mmask, other=float("inf"))
            delta = tl.load(delta_base + rows_m, mask=mmask, other=0.0)
        else:
            lse = tl.load(lse_base + rows_m)
            delta = tl.load(delta_base + rows_m)
        st = tl.dot(ka, tl.trans(qa))  # [N, M]: logits transposed
        dpt = tl.dot(va, tl.trans(doa))
        if HAS_TAIL:
            qb = _load_rot(q_base, rows_m, sql, cols_b, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, True, ROPE)
            dob = _load(do_base, rows_m, sdl, cols_b, mmask, HD, MASK, True)
            st = tl.dot(kb, tl.trans(qb), st)
            dpt = tl.dot(vb, tl.trans(dob), dpt)
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        dst = pt * (dpt - delta[None, :])
        pt = pt.to(qa.dtype)
        dst = dst.to(qa.dtype)
        dv_a = tl.dot(pt, doa, dv_a)
        dk_a = tl.dot(dst, qa, dk_a)
        if HAS_TAIL:
            dv_b = tl.dot(pt, dob, dv_b)
            dk_b = tl.dot(dst, qb, dk_b)
        if FUSE_DQ:  # dq (unscaled, rotated frame) += dS @ K, float32 atomics
            ds = tl.trans(dst)
            dq_ptrs = dq_base + rows_m[:, None] * _al(sacc_l) + cols_a[None, :]
            tl.atomic_add(dq_ptrs, tl.dot(ds, ka), mask=mmask[:, None], sem="relaxed")
            if HAS_TAIL:
                dq_ptrs = dq_base + rows_m[:, None] * _al(sacc_l) + cols_b[None, :]
                tl.atomic_add(dq_ptrs, tl.dot(ds, kb), mask=mmask[:, None] & (cols_b[None, :] < HD), sem="relaxed")
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DKACC, DQACC, INV_FREQ,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh,
    sdkb, sdkl, sdkh, sdvb, sdvl, sdvh, sab, sal, sah, skab, skal, skah,
    L, HQ, HKV, GROUP, GH, GW, T_OFF, qk_scale, scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FUSE_DQ: tl.constexpr,
    ROPE_K: tl.constexpr,
):
    """dK, dV of one block of keys of one kv head, summed over every query head of its group.

    ROPE rotates q; ROPE_K rotates this program's k tile (False when the launcher passes k already
    rotated, see `ROTATE_K_FIRST`).

    DQACC: float32 [B, L, HQ, HD] accumulator of the unscaled dq (FUSE_DQ). DKACC: float32
    [B, L, HKV, HD] for the unscaled, still rotated dk when ROPE (the epilogue rotates it back).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows_n < L
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    k_base = K + _al(b * skb + hk * skh)
    v_base = V + _al(b * svb + hk * svh)
    ka = _load_rot(k_base, rows_n, skl, cols_a, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, False, ROPE_K)
    va = _load(v_base, rows_n, svl, cols_a, nmask, HD, True, False)
    kb = tl.zeros([BLOCK_N, 16], dtype=ka.dtype)
    vb = tl.zeros([BLOCK_N, 16], dtype=ka.dtype)
    if HAS_TAIL:
        kb = _load_rot(k_base, rows_n, skl, cols_b, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, True, ROPE_K)
        vb = _load(v_base, rows_n, svl, cols_b, nmask, HD, True, True)
    dk_a = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    l_full = (L // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        q_base = Q + _al(b * sqb + h * sqh)
        do_base = DO + _al(b * sdb + h * sdh)
        dq_base = DQACC + _al(b * sab + h * sah)
        lse_base = LSE + bh * L
        delta_base = DELTA + bh * L
        dk_a, dk_b, dv_a, dv_b = _dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_base, do_base, lse_base, delta_base, dq_base,
            sql, sdl, sal, 0, l_full, L, qk_scale, INV_FREQ, GH, GW, T_OFF,
            HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_M, False, FUSE_DQ,
        )
        if l_full < L:
            dk_a, dk_b, dv_a, dv_b = _dkdv_inner(
                dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, q_base, do_base, lse_base, delta_base, dq_base,
                sql, sdl, sal, l_full, L, L, qk_scale, INV_FREQ, GH, GW, T_OFF,
                HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_M, True, FUSE_DQ,
            )
    rmask = nmask[:, None]
    dv_base = DV + _al(b * sdvb + hk * sdvh)
    tl.store(dv_base + rows_n[:, None] * _al(sdvl) + cols_a[None, :], dv_a.to(DV.dtype.element_ty), mask=rmask)
    if HAS_TAIL:
        tmask = rmask & (cols_b[None, :] < HD)
        tl.store(dv_base + rows_n[:, None] * _al(sdvl) + cols_b[None, :], dv_b.to(DV.dtype.element_ty), mask=tmask)
    if ROPE:  # unscaled, rotated-frame dk to float32; the epilogue scales and rotates back
        dk_base = DKACC + _al(b * skab + hk * skah)
        tl.store(dk_base + rows_n[:, None] * _al(skal) + cols_a[None, :], dk_a, mask=rmask)
        if HAS_TAIL:
            tl.store(dk_base + rows_n[:, None] * _al(skal) + cols_b[None, :], dk_b, mask=tmask)
    else:
        dk_base = DK + _al(b * sdkb + hk * sdkh)
        tl.store(dk_base + rows_n[:, None] * _al(sdkl) + cols_a[None, :], (dk_a * scale).to(DK.dtype.element_ty), mask=rmask)
        if HAS_TAIL:
            tl.store(
                dk_base + rows_n[:, None] * _al(sdkl) + cols_b[None, :], (dk_b * scale).to(DK.dtype.element_ty), mask=tmask
            )


# dK/dV (and, by default, dQ by float32 atomics) on pre-rotated q/k: TMA descriptors per head over
# [L, hd] as in the forward, so the hd-72 tail tile reads zeros past column 72 and rows >= L read as
# zeros (their lse is +inf, so their probabilities are 0). Each product's main and tail parts are
# issued back to back (dV_a, dV_b, then dK_a, dK_b) so that one wgmma wait covers both.
@triton.jit
def _add_tile(desc, base, row_stride, row0, h, col0, x, L, HD: tl.constexpr):
    """base[rows, col0:col0+W] += x (float32), clipped to rows < L and columns < HD: a TMA bulk reduction
    (one instruction, no per-element addresses in registers) on the GPU; element atomics in the
    interpreter, which has no descriptor reduction."""
    if _TMA_REDUCE:
        desc.atomic_add([row0, h, col0], x.reshape(x.shape[0], 1, x.shape[1]))
    else:
        rows = row0 + tl.arange(0, x.shape[0])
        cols = col0 + tl.arange(0, x.shape[1])
        mask = (cols < HD)[None, :] & (rows < L)[:, None]
        tl.atomic_add(base + rows[:, None] * _al(row_stride) + cols[None, :], x, mask=mask, sem="relaxed")


@triton.jit
def _dkdv_tma_inner(
    dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, qa_desc, qb_desc, doa_desc, dob_desc, dqa_desc, dqb_desc, h,
    lse_base, delta_base, dq_base, sacc_l, L, qk_scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    for start_m in tl.range(0, L, BLOCK_M):
        rows_m = start_m + tl.arange(0, BLOCK_M)
        qa = qa_desc.load([start_m, h, 0]).reshape(BLOCK_M, D0)
        doa = doa_desc.load([start_m, h, 0]).reshape(BLOCK_M, D0)
        # rows >= L: q and dO read as zeros, lse = +inf makes their probabilities 0 (one loop, no masked copy)
        lse = tl.load(lse_base + rows_m, mask=rows_m < L, other=float("inf"))
        delta = tl.load(delta_base + rows_m, mask=rows_m < L, other=0.0)
        st = tl.dot(ka, tl.trans(qa))  # [N, M]: logits transposed
        if HAS_TAIL:
            qb = qb_desc.load([start_m, h, D0]).reshape(BLOCK_M, 16)
            st = tl.dot(kb, tl.trans(qb), st)
        # P^T is rounded to the input dtype before dP^T is computed, so the float32 logits and dP^T are
        # never live together (the register budget of the fused-dQ kernel at hd 72); dS takes the
        # rounded P, an error of the size of dS's own rounding
        pt = tl.math.exp2(st * qk_scale - lse[None, :]).to(qa.dtype)
        if HAS_TAIL:
            dob = dob_desc.load([start_m, h, D0]).reshape(BLOCK_M, 16)
        dv_a = tl.dot(pt, doa, dv_a)
        if HAS_TAIL:
            dv_b = tl.dot(pt, dob, dv_b)
        dpt = tl.dot(va, tl.trans(doa))
        if HAS_TAIL:
            dpt = tl.dot(vb, tl.trans(dob), dpt)
        dst = (pt.to(tl.float32) * (dpt - delta[None, :])).to(qa.dtype)
        dk_a = tl.dot(dst, qa, dk_a)
        if HAS_TAIL:
            dk_b = tl.dot(dst, qb, dk_b)
        if FUSE_DQ:  # dq (unscaled) += dS @ K in float32; k rows >= L are zeros and add nothing
            ds = tl.trans(dst)
            _add_tile(dqa_desc, dq_base, sacc_l, start_m, h, 0, tl.dot(ds, ka), L, HD)
            if HAS_TAIL:
                _add_tile(dqb_desc, dq_base, sacc_l, start_m, h, D0, tl.dot(ds, kb), L, HD)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def attn_bwd_dkdv_tma_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQACC,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh, sab, sal, sah,
    L, HQ, HKV, GROUP, qk_scale, scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSE_DQ: tl.constexpr,
):
    """dK, dV of one block of keys of one kv head (pre-rotated q/k), summed over the query heads of its
    group; with FUSE_DQ also dq by atomics into DQACC (float32 [B, L, HQ, HD], unscaled)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    k_base = K + _al(b * skb + hk * skh)
    v_base = V + _al(b * svb + hk * svh)
    ka = _head_desc(k_base, L, skl, HD, BLOCK_N, D0).load([start_n, 0])
    va = _head_desc(v_base, L, svl, HD, BLOCK_N, D0).load([start_n, 0])
    kb = tl.zeros([BLOCK_N, 16], dtype=ka.dtype)
    vb = tl.zeros([BLOCK_N, 16], dtype=ka.dtype)
    if HAS_TAIL:
        kb = _head_desc(k_base, L, skl, HD, BLOCK_N, 16).load([start_n, D0])
        vb = _head_desc(v_base, L, svl, HD, BLOCK_N, 16).load([start_n, D0])
    dk_a = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    # descriptors over [L, HQ, HD] of this batch element, made once (not per head: a TMA reduction may
    # still be reading its descriptor when the next head starts); a box is one head's rows, and
    # columns >= HD / rows >= L read as zeros (the dQ reductions are clipped there)
    qa_desc = _heads_desc(Q + _al(b * sqb), L, HQ, sql, sqh, HD, BLOCK_M, D0)
    doa_desc = _heads_desc(DO + _al(b * sdb), L, HQ, sdl, sdh, HD, BLOCK_M, D0)
    dqa_desc = _heads_desc(DQACC + _al(b * sab), L, HQ, sal, sah, HD, BLOCK_M, D0)
    qb_desc = qa_desc
    dob_desc = doa_desc
    dqb_desc = dqa_desc
    if HAS_TAIL:
        qb_desc = _heads_desc(Q + _al(b * sqb), L, HQ, sql, sqh, HD, BLOCK_M, 16)
        dob_desc = _heads_desc(DO + _al(b * sdb), L, HQ, sdl, sdh, HD, BLOCK_M, 16)
        dqb_desc = _heads_desc(DQACC + _al(b * sab), L, HQ, sal, sah, HD, BLOCK_M, 16)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        dq_base = DQACC + _al(b * sab + h * sah)
        dk_a, dk_b, dv_a, dv_b = _dkdv_tma_inner(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, qa_desc, qb_desc, doa_desc, dob_desc, dqa_desc, dqb_desc,
            h.to(tl.int32), LSE + bh * L, DELTA + bh * L, dq_base, sal, L, qk_scale, HD, D0, HAS_TAIL, BLOCK_M,
            FUSE_DQ,
        )
    rows_n = start_n + tl.arange(0, BLOCK_N)
    rmask = (rows_n < L)[:, None]
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    tmask = rmask & (cols_b[None, :] < HD)
    dv_base = DV + _al(b * sdvb + hk * sdvh) + rows_n[:, None] * _al(sdvl)
    dk_base = DK + _al(b * sdkb + hk * sdkh) + rows_n[:, None] * _al(sdkl)
    tl.store(dv_base + cols_a[None, :], dv_a.to(DV.dtype.element_ty), mask=rmask)
    tl.store(dk_base + cols_a[None, :], (dk_a * scale).to(DK.dtype.element_ty), mask=rmask)
    if HAS_TAIL:
        tl.store(dv_base + cols_b[None, :], dv_b.to(DV.dtype.element_ty), mask=tmask)
        tl.store(dk_base + cols_b[None, :], (dk_b * scale).to(DK.dtype.element_ty), mask=tmask)


@triton.jit
def _dq_inner(
    dq_a, dq_b, qa, qb, doa, dob, lse, delta, k_base, v_base, skl, svl, start, end, L, qk_scale,
    INV_FREQ, GH, GW, T_OFF,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
):
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    for start_n in range(start, end, BLOCK_N):
        rows_n = start_n + tl.arange(0, BLOCK_N)
        nmask = rows_n < L
        ka = _load_rot(k_base, rows_n, skl, cols_a, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, False, ROPE)
        va = _load(v_base, rows_n, svl, cols_a, nmask, HD, MASK, False)
        s = tl.dot(qa, tl.trans(ka))
        dp = tl.dot(doa, tl.trans(va))
        if HAS_TAIL:
            kb = _load_rot(k_base, rows_n, skl, cols_b, nmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, MASK, True, ROPE)
            vb = _load(v_base, rows_n, svl, cols_b, nmask, HD, MASK, True)
            s = tl.dot(qb, tl.trans(kb), s)
            dp = tl.dot(dob, tl.trans(vb), dp)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            p = tl.where(nmask[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(qa.dtype)
        dq_a = tl.dot(ds, ka, dq_a)
        if HAS_TAIL:
            dq_b = tl.dot(ds, kb, dq_b)
    return dq_a, dq_b


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DQACC, INV_FREQ,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh, sdqb, sdql, sdqh, sab, sal, sah,
    L, HQ, GROUP, GH, GW, T_OFF, qk_scale, scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block of one head, keys summed in a fixed order (the deterministic path)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rows_m < L
    cols_a = tl.arange(0, D0)
    cols_b = D0 + tl.arange(0, 16)
    q_base = Q + _al(b * sqb + h * sqh)
    do_base = DO + _al(b * sdb + h * sdh)
    qa = _load_rot(q_base, rows_m, sql, cols_a, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, False, ROPE)
    doa = _load(do_base, rows_m, sdl, cols_a, mmask, HD, True, False)
    qb = tl.zeros([BLOCK_M, 16], dtype=qa.dtype)
    dob = tl.zeros([BLOCK_M, 16], dtype=qa.dtype)
    if HAS_TAIL:
        qb = _load_rot(q_base, rows_m, sql, cols_b, mmask, INV_FREQ, GH, GW, T_OFF, HD, C0, C1, True, True, ROPE)
        dob = _load(do_base, rows_m, sdl, cols_b, mmask, HD, True, True)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows_m, mask=mmask, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows_m, mask=mmask, other=0.0)
    k_base = K + _al(b * skb + hk * skh)
    v_base = V + _al(b * svb + hk * svh)
    dq_a = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    l_full = (L // BLOCK_N) * BLOCK_N
    dq_a, dq_b = _dq_inner(
        dq_a, dq_b, qa, qb, doa, dob, lse, delta, k_base, v_base, skl, svl, 0, l_full, L, qk_scale,
        INV_FREQ, GH, GW, T_OFF, HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_N, False,
    )
    if l_full < L:
        dq_a, dq_b = _dq_inner(
            dq_a, dq_b, qa, qb, doa, dob, lse, delta, k_base, v_base, skl, svl, l_full, L, L, qk_scale,
            INV_FREQ, GH, GW, T_OFF, HD, D0, HAS_TAIL, ROPE, C0, C1, BLOCK_N, True,
        )
    rmask = mmask[:, None]
    tmask = rmask & (cols_b[None, :] < HD)
    if ROPE:  # unscaled, rotated-frame dq to float32; the epilogue scales and rotates back
        a_base = DQACC + _al(b * sab + h * sah)
        tl.store(a_base + rows_m[:, None] * _al(sal) + cols_a[None, :], dq_a, mask=rmask)
        if HAS_TAIL:
            tl.store(a_base + rows_m[:, None] * _al(sal) + cols_b[None, :], dq_b, mask=tmask)
    else:
        dq_base = DQ + _al(b * sdqb + h * sdqh)
        tl.store(dq_base + rows_m[:, None] * _al(sdql) + cols_a[None, :], (dq_a * scale).to(DQ.dtype.element_ty), mask=rmask)
        if HAS_TAIL:
            tl.store(
                dq_base + rows_m[:, None] * _al(sdql) + cols_b[None, :], (dq_b * scale).to(DQ.dtype.element_ty), mask=tmask
            )


@triton.jit
def _epilogue_tile(
    a_base, x_base, rows, rmask, cols, sal, sxl, INV_FREQ, GH, GW, T_OFF, scale,
    HD: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, ROPE: tl.constexpr, COL_MASK: tl.constexpr,
    INVERSE: tl.constexpr,
):
    g = _load(a_base, rows, sal, cols, rmask, HD, True, COL_MASK).to(tl.float32)
    if ROPE:
        partner, sign, axis = _rope_cols(cols, HD, C0, C1)
        gp = _load(a_base, rows, sal, partner, rmask, HD, True, COL_MASK).to(tl.float32)
        c, s = _rope_cos_sin(rows, cols, axis, INV_FREQ, GH, GW, T_OFF, HD)
        if INVERSE:
            g = g * c - gp * (sign[None, :] * s)
        else:
            g = g * c + gp * (sign[None, :] * s)
    tl.store(
        x_base + rows[:, None] * _al(sxl) + cols[None, :],
        (g * scale).to(x_base.dtype.element_ty),
        mask=rmask[:, None] & (cols[None, :] < HD),
    )


@triton.jit
def rope_grad_epilogue_kernel(
    ACC, X, INV_FREQ, sab, sal, sah, sxb, sxl, sxh, L, H, GH, GW, T_OFF, scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, ROPE: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, BLOCK_M: tl.constexpr, INVERSE: tl.constexpr,
):
    """x = scale * R^T acc (INVERSE: the gradient of a rotated q / k taken back through the RoPE), or
    x = scale * R acc (a rotated copy), cast to x's dtype.

    R x = x*cos + sign*x[partner]*sin, so R^T g = g*cos - sign*g[partner]*sin.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    a_base = ACC + _al(b * sab + h * sah)
    x_base = X + _al(b * sxb + h * sxh)
    _epilogue_tile(
        a_base, x_base, rows, rmask, tl.arange(0, D0), sal, sxl, INV_FREQ, GH, GW, T_OFF, scale,
        HD, C0, C1, ROPE, False, INVERSE,
    )
    if HAS_TAIL:
        _epilogue_tile(
            a_base, x_base, rows, rmask, D0 + tl.arange(0, 16), sal, sxl, INV_FREQ, GH, GW, T_OFF, scale,
            HD, C0, C1, ROPE, True, INVERSE,
        )


# ---------------------------------------------------------------------------------------------
# Configurations and launchers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of an attention kernel."""

    block_m: int
    """query rows per tile (per program in the forward and dQ kernels; per step in dK/dV)."""
    block_n: int
    """key rows per tile (per step in the forward and dQ kernels; per program in dK/dV)."""
    num_warps: int
    """warps per program: a multiple of 4 so that Hopper's warpgroup MMA (wgmma) is used."""
    num_stages: int
    """software-pipelining depth of the loads in the inner loop."""

    def triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps, num_stages=self.num_stages
        )


# Hopper (sm_90) search spaces; the first entry of each is the expected winner, which the AOT
# report compiles (lavin-fast kernels --report --op attention: no spills, HGMMA present). In-kernel
# RoPE keeps a rotated tile and its cos/sin live in registers, so those variants take narrower
# key tiles. wgmma needs >= 64 rows per warpgroup in the instruction's M dim.
_C = TileConfig
FWD_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {  # (hd, rope)
    # pre-rotated q/k (attn_fwd_tma_kernel): 128 x 64 tiles, 8 warps (a warpgroup per 64 rows), two
    # CTAs per SM at every head dim: four warpgroups per SM, so one's softmax overlaps another's wgmma
    # (the static report's pick, docs/attention.md; 64-row tiles model faster still but double the
    # L2 -> shared-memory traffic per FLOP, which the model does not charge for)
    (64, False): [_C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 8, 3)],
    (72, False): [_C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 8, 2), _C(64, 128, 4, 2)],
    (128, False): [_C(128, 64, 8, 2), _C(128, 128, 8, 2), _C(128, 64, 8, 3)],
    (64, True): [_C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(128, 64, 8, 4), _C(64, 64, 4, 3)],
    (72, True): [_C(128, 64, 8, 3), _C(128, 64, 8, 4), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
    (128, True): [_C(128, 64, 8, 3), _C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
}
# in-kernel RoPE (attn_bwd_dkdv_kernel, pointer loads), (hd, rope, fused atomic dQ)
DKDV_CONFIGS: dict[tuple[int, bool, bool], list[TileConfig]] = {
    (64, True, True): [_C(32, 128, 8, 2), _C(64, 128, 8, 2), _C(64, 64, 4, 2)],
    (64, True, False): [_C(64, 128, 8, 2), _C(32, 128, 8, 2), _C(64, 64, 4, 2)],
    (72, True, False): [_C(32, 128, 8, 1), _C(16, 128, 8, 2), _C(32, 128, 8, 2)],
    (128, True, False): [_C(16, 128, 8, 2), _C(32, 128, 8, 2), _C(16, 64, 4, 2)],
}
# pre-rotated q/k (attn_bwd_dkdv_tma_kernel), (hd, fused dQ): at hd 64 and 72 one warpgroup per 64 keys
# and 64 queries, two CTAs per SM (no spills; registers <= 255 x 128 threads and shared memory allow 2);
# at hd 72 with the fused dQ the loads are single-buffered (two stages spill 12 B; the other CTA hides
# the load latency, but Triton then waits on every wgmma: 10 waits per iteration, against 4 for the
# double-buffered kernel without dQ, one per product).
# hd 128: 8 warps, one CTA per SM
DKDV_TMA_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {
    (64, True): [_C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (64, False): [_C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (72, True): [_C(64, 64, 4, 1), _C(64, 128, 8, 2), _C(32, 64, 4, 2)],
    (72, False): [_C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (128, True): [_C(32, 128, 8, 2), _C(64, 128, 8, 1), _C(64, 64, 4, 1)],
    (128, False): [_C(32, 128, 8, 2), _C(64, 128, 8, 1), _C(64, 64, 4, 1)],
}
DQ_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {  # (hd, rope)
    (64, True): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 128, 8, 2)],
    (64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 128, 8, 2)],
    (72, True): [_C(128, 32, 8, 2), _C(64, 64, 4, 2), _C(128, 64, 8, 2)],
    (72, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 32, 8, 2)],
    (128, True): [_C(128, 32, 8, 2), _C(64, 32, 4, 2), _C(64, 64, 4, 2)],
    (128, False): [_C(128, 32, 8, 2), _C(64, 32, 4, 2), _C(64, 64, 4, 2)],
}
# dQ by float32 atomics from the dK/dV kernel (5 matmuls instead of 7, not bit-reproducible) only
# where that kernel compiles without spills on sm_90; elsewhere a separate dQ kernel recomputes.
FUSED_DQ_HEAD_DIMS = (64,)
# head dims whose dK/dV kernel takes k already rotated (one elementwise pass) instead of rotating its
# k tile itself: at hd 128 the rotated tile held in registers as a wgmma operand, next to the two
# 128 x 128 float32 accumulators, spills on sm_90 in every configuration tried
ROTATE_K_FIRST_HEAD_DIMS = (128,)

ELEMENTWISE_BLOCK_M = 64
# log2 units by which a row's block max must exceed its running max before the forward rescales its
# accumulator: probabilities stay <= 2**8 (exact in float32), and the rescale is skipped on almost every
# key block after the first few
RESCALE_SLACK = 8.0
# the interpreter runs one fixed configuration (it is slow; L = 200 still spans 3 full blocks + 1 partial)
INTERPRETER_CONFIG = TileConfig(64, 64, 4, 1)

_TUNED: dict[tuple, object] = {}
_TUNE_LOGGED: set[tuple] = set()
_INV_FREQ: dict[tuple, torch.Tensor] = {}
log = logging.getLogger(__name__)


def autotune_enabled() -> bool:
    """LAVIN_FAST_ATTENTION_TUNE=1 searches each kernel's candidate list on first use; the default (unset
    or 0) launches the first candidate, which is the configuration chosen by the static sm_90 report."""
    value = os.environ.get("LAVIN_FAST_ATTENTION_TUNE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"LAVIN_FAST_ATTENTION_TUNE must be 0 or 1, got {value!r}")
    return value == "1"


def _launch(kernel, configs: list[TileConfig], grid_of, args: tuple, consts: dict, reset: list[str] | None = None):
    """Launch `kernel` with the first (statically chosen) configuration, autotuned over `configs` when
    LAVIN_FAST_ATTENTION_TUNE=1, or with the fixed interpreter configuration."""
    if interpreter_active():
        cfg = INTERPRETER_CONFIG
        kernel[grid_of(cfg.block_m, cfg.block_n)](*args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        return
    if not autotune_enabled():
        cfg = configs[0]
        kernel[grid_of(cfg.block_m, cfg.block_n)](
            *args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        return
    # one autotuner per kernel variant (its cache is keyed on L, HQ, GROUP and dtypes, not constexprs);
    # Triton keeps the winners on disk (cache_results), so a process pays the search once per shape
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    key = (name, tuple(sorted(consts.items())), tuple(configs), tuple(reset or ()))
    tuned = _TUNED.get(key)
    if tuned is None:
        tuned = triton.autotune(
            [c.triton() for c in configs], key=["L", "HQ", "GROUP"], reset_to_zero=reset, cache_results=True
        )(kernel)
        _TUNED[key] = tuned
    if key not in _TUNE_LOGGED:  # the search compiles and times every candidate: never silently
        _TUNE_LOGGED.add(key)
        log.warning(
            "attention: autotuning %s over %d configurations on first use of each (L, Hq, group) "
            "(LAVIN_FAST_ATTENTION_TUNE=1; Triton's on-disk cache skips shapes already tuned)", name, len(configs),
        )
    tuned[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts)


def _inv_freq(hd: int, device: torch.device) -> torch.Tensor:
    key = (hd, str(device))
    t = _INV_FREQ.get(key)
    if t is None:
        t = rope_inv_freq(hd, device).contiguous()
        _INV_FREQ[key] = t
    return t


def _consts(hd: int, rope: bool) -> dict:
    d0, has_tail = head_dim_tiles(hd)
    dt, dy, _ = rope_split(hd)
    return {"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "ROPE": rope, "C0": dt, "C1": dt + dy}


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, token and head strides in units of 8 elements (see `_al` in the kernels)."""
    st = x.stride()[:3]
    assert all(v % 8 == 0 for v in st), f"strides {x.stride()} must be multiples of 8 here"
    return st[0] // 8, st[1] // 8, st[2] // 8


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous, its other strides multiples of 8 and its data 16-byte
    aligned (what the kernels' alignment hints assume; true of views of a fused QKV projection), else a copy."""
    ok = x.stride(-1) == 1 and all(st % 8 == 0 for st in x.stride()[:-1]) and x.data_ptr() % 16 == 0
    return x if ok else x.contiguous()


def _grid_args(grid: tuple[int, int, int] | None, t_offset: int) -> tuple[int, int, int]:
    if grid is None:
        return 1, 1, 0
    return grid[1], grid[2], t_offset


def default_configs(hd: int, rope: bool, deterministic: bool) -> dict[str, TileConfig]:
    """The launch configuration of each kernel the library runs for these settings without autotuning
    (what the GPU benchmark reports next to its timings)."""
    fuse = not deterministic and (not rope or hd in FUSED_DQ_HEAD_DIMS)
    out = {"fwd": FWD_CONFIGS[(hd, rope)][0]}
    out["dkdv+dq" if fuse else "dkdv"] = DKDV_TMA_CONFIGS[(hd, fuse)][0] if not rope else DKDV_CONFIGS[(hd, rope, fuse)][0]
    if not fuse:
        out["dq"] = DQ_CONFIGS[(hd, rope)][0]
    return out


def forward(q, k, v, scale: float, grid, t_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out [B, L, Hq, hd], lse [B, Hq, L] float32, base 2)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, L, HQ, hd = q.shape
    HKV = k.shape[2]
    out = torch.empty((B, L, HQ, hd), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, L), dtype=torch.float32, device=q.device)
    rope = grid is not None
    grid_of = lambda bm, bn: (triton.cdiv(L, bm), B * HQ)  # noqa: E731
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out))
    if not rope:  # the default path: TMA descriptors (q/k pre-rotated by qk_norm_rope, or no RoPE)
        use_tma_scratch()
        d0, has_tail = head_dim_tiles(hd)
        consts = {"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "RESCALE_SLACK": RESCALE_SLACK,
                  "WARP_SPECIALIZE": interpreter_active()}
        args = (q, k, v, out, lse, *strides, L, HQ, HQ // HKV, scale * LOG2E)
        _launch(attn_fwd_tma_kernel, FWD_CONFIGS[(hd, False)], grid_of, args, consts)
        return out, lse
    gh, gw, toff = _grid_args(grid, t_offset)
    args = (q, k, v, out, lse, _inv_freq(hd, q.device), *strides, L, HQ, HQ // HKV, gh, gw, toff, scale * LOG2E)
    _launch(attn_fwd_kernel, FWD_CONFIGS[(hd, True)], grid_of, args, _consts(hd, True))
    return out, lse


def backward(do, q, k, v, out, lse, scale: float, grid, t_offset: int, deterministic: bool):
    """Launch the backward kernels: (dq, dk, dv) in the inputs' dtype and shapes (contiguous)."""
    do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
    B, L, HQ, hd = q.shape
    HKV = k.shape[2]
    group = HQ // HKV
    rope = grid is not None
    consts = _consts(hd, rope)
    gh, gw, toff = _grid_args(grid, t_offset)
    inv_freq = _inv_freq(hd, q.device)
    qk_scale = scale * LOG2E
    dev = q.device

    delta = torch.empty((B, HQ, L), dtype=torch.float32, device=dev)
    grid_m = (triton.cdiv(L, ELEMENTWISE_BLOCK_M), B * HQ)
    attn_bwd_pre_kernel[grid_m](
        out, do, delta, *_strides3(out), *_strides3(do), L, HQ,
        HD=hd, D0=consts["D0"], HAS_TAIL=consts["HAS_TAIL"], BLOCK_M=ELEMENTWISE_BLOCK_M, num_warps=4,
    )

    dq = torch.empty((B, L, HQ, hd), dtype=q.dtype, device=dev)
    dk = torch.empty((B, L, HKV, hd), dtype=k.dtype, device=dev)
    dv = torch.empty((B, L, HKV, hd), dtype=v.dtype, device=dev)
    # pre-rotated q/k: dQ fused into the dK/dV kernel (TMA reductions) at every head dim unless deterministic
    fuse_dq = not deterministic and (not rope or hd in FUSED_DQ_HEAD_DIMS)
    # float32 dq: atomically accumulated (fused), or written once in the rotated frame (deterministic + RoPE)
    if fuse_dq:
        dq_acc = torch.zeros((B, L, HQ, hd), dtype=torch.float32, device=dev)
    elif rope:
        dq_acc = torch.empty((B, L, HQ, hd), dtype=torch.float32, device=dev)
    else:
        dq_acc = dq  # not read or written
    dk_acc = torch.empty((B, L, HKV, hd), dtype=torch.float32, device=dev) if rope else dk

    def rope_pass(src, dst, heads, inverse):
        rope_grad_epilogue_kernel[(triton.cdiv(L, ELEMENTWISE_BLOCK_M), B * heads)](
            src, dst, inv_freq, *_strides3(src), *_strides3(dst), L, heads, gh, gw, toff, scale if inverse else 1.0,
            **consts, BLOCK_M=ELEMENTWISE_BLOCK_M, INVERSE=inverse, num_warps=4,
        )

    grid_n = lambda bm, bn: (triton.cdiv(L, bn), B * HKV)  # noqa: E731
    if not rope:  # the default path (q/k pre-rotated by qk_norm_rope, or no RoPE): TMA descriptors
        use_tma_scratch()
        args = (
            q, k, v, do, lse, delta, dk, dv, dq_acc,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            *_strides3(dq_acc), L, HQ, HKV, group, qk_scale, scale,
        )
        tma_consts = {"HD": hd, "D0": consts["D0"], "HAS_TAIL": consts["HAS_TAIL"], "FUSE_DQ": fuse_dq}
        _launch(attn_bwd_dkdv_tma_kernel, DKDV_TMA_CONFIGS[(hd, fuse_dq)], grid_n, args, tma_consts,
                reset=["DQACC"] if fuse_dq else None)
    else:
        rope_k = hd not in ROTATE_K_FIRST_HEAD_DIMS
        k_in = k
        if not rope_k:
            k_in = torch.empty((B, L, HKV, hd), dtype=k.dtype, device=dev)
            rope_pass(k, k_in, HKV, False)
        args = (
            q, k_in, v, do, lse, delta, dk, dv, dk_acc, dq_acc, inv_freq,
            *_strides3(q), *_strides3(k_in), *_strides3(v), *_strides3(do),
            *_strides3(dk), *_strides3(dv), *_strides3(dq_acc), *_strides3(dk_acc),
            L, HQ, HKV, group, gh, gw, toff, qk_scale, scale,
        )
        _launch(attn_bwd_dkdv_kernel, DKDV_CONFIGS[(hd, rope, fuse_dq)], grid_n, args,
                {**consts, "FUSE_DQ": fuse_dq, "ROPE_K": rope_k}, reset=["DQACC"] if fuse_dq else None)

    if not fuse_dq:
        args = (
            q, k, v, do, lse, delta, dq, dq_acc, inv_freq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *_strides3(dq_acc),
            L, HQ, group, gh, gw, toff, qk_scale, scale,
        )
        _launch(attn_bwd_dq_kernel, DQ_CONFIGS[(hd, rope)], lambda bm, bn: (triton.cdiv(L, bm), B * HQ), args, consts)

    if fuse_dq or rope:
        rope_pass(dq_acc, dq, HQ, True)
    if rope:
        rope_pass(dk_acc, dk, HKV, True)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library ops (one op each for torch.compile / FSDP / checkpointing) and autograd
# ---------------------------------------------------------------------------------------------


def _grid_of(rope_t: int, rope_h: int, rope_w: int) -> tuple[int, int, int] | None:
    return None if rope_t == 0 else (rope_t, rope_h, rope_w)


@torch.library.custom_op("lavin_fast::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    rope_t: int, rope_h: int, rope_w: int, rope_t_offset: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); rope_t == 0 means no RoPE. `deterministic` is used by the backward."""
    return forward(q, k, v, scale, _grid_of(rope_t, rope_h, rope_w), rope_t_offset)


@flash_attention_fwd.register_fake
def _(q, k, v, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic):
    B, L, HQ, hd = q.shape
    return q.new_empty((B, L, HQ, hd)), q.new_empty((B, HQ, L), dtype=torch.float32)


@torch.library.custom_op("lavin_fast::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, rope_t: int, rope_h: int, rope_w: int, rope_t_offset: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do, q, k, v, out, lse, scale, _grid_of(rope_t, rope_h, rope_w), rope_t_offset, deterministic)


@flash_attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = (scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, scale: float, grid, t_offset: int, deterministic: bool) -> torch.Tensor:
    """Validated inputs in, attention out [B, L, Hq, hd] (differentiable)."""
    rt, rh, rw = grid if grid is not None else (0, 0, 0)
    out, _ = flash_attention_fwd(q, k, v, float(scale), rt, rh, rw, int(t_offset), bool(deterministic))
    return out
