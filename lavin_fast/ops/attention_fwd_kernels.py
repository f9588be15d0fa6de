"""Triton flash-attention forward kernels: `attn_fwd_kernel` (pointer loads, RoPE optionally inside)
and `attn_fwd_tma_kernel` (the default: pre-rotated q/k through TMA descriptors), and `attn_v_tail_kernel`
(v's tail tile of the TMA forward). Launchers and configurations:
lavin_fast.ops.attention_kernels; design: docs/attention.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lavin_fast.ops.attention_device import _al, _head_desc, _load, _load_rot, _store_kv_tails


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
    if RESCALE_SLACK == 0:  # FA2's update on every block, no branch (a loop Triton 3.6 can warp-specialise)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_a = acc_a * alpha[:, None]
        if HAS_TAIL:
            acc_b = acc_b * alpha[:, None]
        m_i = m_new
    # the running max moves only when a row's block max exceeds it by more than RESCALE_SLACK
    # (log2 units): p <= 2**RESCALE_SLACK stays exact in float32 and the accumulator rescale
    # (a multiply per accumulator element) is skipped on almost every iteration after the first
    elif tl.max(m_blk - m_i, 0) > RESCALE_SLACK:
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc_a = acc_a * alpha[:, None]
        if HAS_TAIL:
            acc_b = acc_b * alpha[:, None]
        m_i = m_new
    p = tl.math.exp2(s * qk_scale - m_i[:, None])
    if not HAS_TAIL:  # with a tail tile, the P V_tail product sums the rows (V_tail's column HD - D0 is ones)
        l_i += tl.sum(p, 1)
    p = p.to(dtype)
    acc_a = tl.dot(p, va_desc.load([start_n, 0]), acc_a)
    if HAS_TAIL:
        acc_b = tl.dot(p, vb_desc.load([start_n, 0]), acc_b)
    return acc_a, acc_b, m_i, l_i


@triton.jit
def attn_fwd_tma_kernel(
    Q, K, V, VT, O, LSE,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, svtb, svtl, svth, sob, sol, soh,
    L, HQ, GROUP, qk_scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, RESCALE_SLACK: tl.constexpr,
):
    """Forward of one query block of one (batch, query head) on q/k already rotated (or no RoPE).

    VT (HAS_TAIL): v's tail tile as its own [B, L, HKV, 16] tensor, columns 64..HD-1 of v, then a column of
    ones, then zeros (`v_tail` in the launcher): the tail product P @ VT then also sums each row of P, so the
    softmax's row sum costs no instructions of its own (32 FADD and a shuffle reduction per thread and key block
    at hd 72). Ignored without a tail tile."""
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
        vb_desc = _head_desc(VT + _al(b * svtb + hk * svth), L, svtl, 16, BLOCK_N, 16)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    dt: tl.constexpr = qa.dtype
    if WARP_SPECIALIZE:
        # Triton 3.6 warp-specialises this loop on sm_90 (a TMA producer warp, the program's warps as
        # consumers) only if it has no data-dependent branch (so no lazy rescale: FA2's update every block),
        # the partial last block is not peeled after it (so every block is masked; rows >= L read as zeros)
        # and the program has 4 warps (docs/attention.md: the bisection against the tutorial's loop)
        for start_n in tl.range(0, L, BLOCK_N, warp_specialize=True):
            s = _fwd_tma_scores(qa, qb, ka_desc, kb_desc, start_n, D0, HAS_TAIL)
            acc_a, acc_b, m_i, l_i = _fwd_tma_update(
                s, acc_a, acc_b, m_i, l_i, va_desc, vb_desc, start_n, L, qk_scale, dt, D0, HAS_TAIL, BLOCK_N, True,
                0.0,
            )
    else:
        l_full = (L // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, l_full, BLOCK_N):
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
    if HAS_TAIL:  # the row sums, accumulated (and rescaled) as column HD of the tail product
        l_i = tl.sum(tl.where((D0 + tl.arange(0, 16) == HD)[None, :], acc_b, 0.0), 1)
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


@triton.jit
def attn_v_tail_kernel(
    V, T, svb, svl, svh, stb, stl, sth, L, H, HD: tl.constexpr, D0: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The TMA forward's VT [B, L, H, 16]: v's columns D0..HD-1, a one at column HD - D0 (the row sums of P),
    zeros (`v_tail` in the launcher is the specification). The backward's k / v tail tiles are written by its
    delta kernel (attn_bwd_pre_kernel)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_base = T + _al(b * stb + h * sth)
    v_base = V + _al(b * svb + h * svh)
    _store_kv_tails(v_base, v_base, t_base, rows, rows < L, svl, svl, stl, 1.0, HD, D0, False)
