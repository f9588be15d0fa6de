"""Triton flash-attention backward kernels: delta = rowsum(dO * O) (at hd 72 also the q / dO tail tiles
with lse and delta beside them), dK/dV (pointer loads with RoPE optionally inside; or the default TMA
kernel with dQ fused by TMA bulk reductions), the separate dQ
kernel of the deterministic path, and the RoPE^T gradient epilogue. Launchers and configurations:
lavin_fast.ops.attention_kernels; design: docs/attention.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lavin_fast.ops.attention_device import (
    _TMA_REDUCE,
    _al,
    _head_desc,
    _heads_desc,
    _load,
    _load_rot,
    _rope_cols,
    _rope_cos_sin,
    _store_kv_tails,
)


@triton.jit
def _split3_tile(t, x, col0: tl.constexpr):
    """t [R, 16] with x [R] (float32) written into columns col0..col0+2 as three values of t's dtype whose float32
    sum is x (the launcher's `_split3`)."""
    hi = x.to(t.dtype)
    r = x - hi.to(tl.float32)
    mid = r.to(t.dtype)
    lo = (r - mid.to(tl.float32)).to(t.dtype)
    c = tl.arange(0, 16)[None, :]
    t = tl.where(c == col0, hi[:, None], t)
    t = tl.where(c == col0 + 1, mid[:, None], t)
    return tl.where(c == col0 + 2, lo[:, None], t)


@triton.jit
def attn_bwd_pre_kernel(
    O, DO, DELTA, Q, LSE, QDT, K, V, KVT, sob, sol, soh, sdb, sdl, sdh, sqb, sql, sqh, sqtb, sqtl, sqth,
    skb, skl, skh, svb, svl, svh, sktb, sktl, skth, L, HQ, GROUP, lse_mul, c,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, WRITE_TAILS: tl.constexpr,
):
    """delta[b, h, l] = sum_d O * dO (float32). WRITE_TAILS (hd 64 and 72, the TMA dK/dV kernel): also QDT
    [B, L, HQ, 32] = q's tail tile with lse * lse_mul in three parts at its columns 8..10, then dO's tail tile
    with -delta in three parts at 24..26 (`stat_tails` in the launcher says why), and, from the first query head
    of each group, KVT [B, L, HKV, 32] = k's and v's tail tiles with c and ones at columns 8..10 of each half
    (`kv_tails`): no launch of their own."""
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
    if WRITE_TAILS:  # (columns >= HD of the tails read as zeros: at hd 64 the tiles hold only the parts)
        cols_t = D0 + tl.arange(0, 16)
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=rmask, other=0.0)
        qt = _load(Q + _al(b * sqb + h * sqh), rows, sql, cols_t, rmask, HD, True, True)
        dot = _load(DO + _al(b * sdb + h * sdh), rows, sdl, cols_t, rmask, HD, True, True)
        t_ptrs = QDT + _al(b * sqtb + h * sqth) + rows[:, None] * _al(sqtl) + tl.arange(0, 16)[None, :]
        tl.store(t_ptrs, _split3_tile(qt, lse * lse_mul, 8), mask=rmask[:, None])
        tl.store(t_ptrs + 16, _split3_tile(dot, -delta, 8), mask=rmask[:, None])
        if h % GROUP == 0:  # the kv head's k / v tail tiles, once per group
            hk = h // GROUP
            _store_kv_tails(K + _al(b * skb + hk * skh), V + _al(b * svb + hk * svh), KVT + _al(b * sktb + hk * skth),
                            rows, rmask, skl, svl, sktl, c, HD, D0, True)  # fmt: skip
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
    CARRY_DQ: tl.constexpr, STATS: tl.constexpr,
):
    # CARRY_DQ: the dQ products of query block i are reduced in iteration i + 1, right after the logits' full
    # wgmma wait (which has waited for them too), and the last block's after the loop. They are then loop-carried
    # values that Triton 3.6 issues without a wait of their own; reduced in their own iteration, each is waited on
    # (fully) before its reduction: 2 full waits per iteration instead of 3 at hd 64, 4 instead of 6 at hd 72.
    # The first iteration adds the zeros it starts with into block 0.
    dq_a = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    for start_m in tl.range(0, L, BLOCK_M):
        rows_m = start_m + tl.arange(0, BLOCK_M)
        qa = qa_desc.load([start_m, h, 0]).reshape(BLOCK_M, D0)
        doa = doa_desc.load([start_m, h, 0]).reshape(BLOCK_M, D0)
        if not STATS:  # (with STATS, lse and delta come in through the tail products: see the kernel)
            # rows >= L: q and dO read as zeros, lse = +inf makes their probabilities 0 (one loop, no masked copy)
            lse = tl.load(lse_base + rows_m, mask=rows_m < L, other=float("inf"))
            delta = tl.load(delta_base + rows_m, mask=rows_m < L, other=0.0)
        st = tl.dot(ka, tl.trans(qa))  # [N, M]: logits transposed
        if STATS:
            qb = qb_desc.load([start_m, h, 0]).reshape(BLOCK_M, 16)
            st = tl.dot(kb, tl.trans(qb), st)
        if FUSE_DQ and CARRY_DQ:  # the previous query block's dQ (its products are done: the wait above)
            prev = tl.maximum(start_m - BLOCK_M, 0)
            _add_tile(dqa_desc, dq_base, sacc_l, prev, h, 0, dq_a, L, HD)
            if HAS_TAIL:
                _add_tile(dqb_desc, dq_base, sacc_l, prev, h, D0, dq_b, L, HD)
        # dS takes the float32 P^T (pt_f), the dV product its rounded copy: rounding P^T first and widening it
        # back for dS cost 32 single-element conversions (F2F) and 16 byte permutes per thread and iteration
        # more than the packed rounding alone, and no registers (255 either way at hd 72, no spills)
        if STATS:  # st already holds S^T - lse / qk_scale
            pt_f = tl.math.exp2(st * qk_scale)
        else:
            pt_f = tl.math.exp2(st * qk_scale - lse[None, :])
        pt = pt_f.to(qa.dtype)
        if STATS:
            dob = dob_desc.load([start_m, h, 16]).reshape(BLOCK_M, 16)
        dv_a = tl.dot(pt, doa, dv_a)
        if HAS_TAIL:
            dv_b = tl.dot(pt, dob, dv_b)
        dpt = tl.dot(va, tl.trans(doa))
        if STATS:
            dpt = tl.dot(vb, tl.trans(dob), dpt)
            # dpt now holds dP^T - delta
            dst = (pt_f * dpt).to(qa.dtype)
        else:
            dst = (pt_f * (dpt - delta[None, :])).to(qa.dtype)
        dk_a = tl.dot(dst, qa, dk_a)
        if HAS_TAIL:
            dk_b = tl.dot(dst, qb, dk_b)
        if FUSE_DQ:  # dq (unscaled) += dS @ K in float32; k rows >= L are zeros and add nothing
            ds = tl.trans(dst)
            if CARRY_DQ:
                dq_a = tl.dot(ds, ka)
                if HAS_TAIL:
                    dq_b = tl.dot(ds, kb)
            else:
                _add_tile(dqa_desc, dq_base, sacc_l, start_m, h, 0, tl.dot(ds, ka), L, HD)
                if HAS_TAIL:
                    _add_tile(dqb_desc, dq_base, sacc_l, start_m, h, D0, tl.dot(ds, kb), L, HD)
    if FUSE_DQ and CARRY_DQ:
        last = ((L - 1) // BLOCK_M) * BLOCK_M
        _add_tile(dqa_desc, dq_base, sacc_l, last, h, 0, dq_a, L, HD)
        if HAS_TAIL:
            _add_tile(dqb_desc, dq_base, sacc_l, last, h, D0, dq_b, L, HD)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def attn_bwd_dkdv_tma_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQACC, QDT, KVT,
    sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sdb, sdl, sdh, sdkb, sdkl, sdkh, sdvb, sdvl, sdvh, sab, sal, sah,
    sqtb, sqtl, sqth, sktb, sktl, skth,
    L, HQ, HKV, GROUP, qk_scale, scale,
    HD: tl.constexpr, D0: tl.constexpr, HAS_TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FUSE_DQ: tl.constexpr, CARRY_DQ: tl.constexpr = False, STATS: tl.constexpr = False,
):
    """dK, dV of one block of keys of one kv head (pre-rotated q/k), summed over the query heads of its
    group; with FUSE_DQ also dq by atomics into DQACC (float32 [B, L, HQ, HD], unscaled), with CARRY_DQ each
    query block's one iteration later (see _dkdv_tma_inner).

    With STATS (hd 72; hd 64, whose tail tiles then carry nothing but the statistics and feed only the
    logits and dP^T products), the tail tiles come from two [B, L, H, 32] tensors that the launcher
    builds (`stat_tails`): QDT holds q's tail (columns 64..HD-1 of q at 0.., 8..10: -lse / (c * qk_scale) as
    three parts in q's dtype that sum to it in float32) and dO's tail (at 16..: columns 64..HD-1 of dO, 24..26:
    -delta in three parts); KVT holds k's tail (8..10: c, a power of two near 1 / qk_scale) and v's tail (24..26:
    ones). The tail products S^T += K_b Q_b^T and dP^T += V_b dO_b^T then yield S^T - lse / qk_scale and
    dP^T - delta, so the loop loads neither lse nor delta (their loads, masks and subtractions were a third of its
    instructions). Rows >= L read as zeros: P = 1 there but dO's rows are zeros, so they add nothing; the extra
    columns of dK, dV and dQ (>= HD) are never stored."""
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
    if STATS:
        kvt_base = KVT + _al(b * sktb + hk * skth)
        kb = _head_desc(kvt_base, L, sktl, 32, BLOCK_N, 16).load([start_n, 0])
        vb = _head_desc(kvt_base, L, sktl, 32, BLOCK_N, 16).load([start_n, 16])
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
    if STATS:
        qb_desc = _heads_desc(QDT + _al(b * sqtb), L, HQ, sqtl, sqth, 32, BLOCK_M, 16)
        dob_desc = qb_desc
    if HAS_TAIL:
        dqb_desc = _heads_desc(DQACC + _al(b * sab), L, HQ, sal, sah, HD, BLOCK_M, 16)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        dq_base = DQACC + _al(b * sab + h * sah)
        dk_a, dk_b, dv_a, dv_b = _dkdv_tma_inner(
            dk_a, dk_b, dv_a, dv_b, ka, kb, va, vb, qa_desc, qb_desc, doa_desc, dob_desc, dqa_desc, dqb_desc,
            h.to(tl.int32), LSE + bh * L, DELTA + bh * L, dq_base, sal, L, qk_scale, HD, D0, HAS_TAIL, BLOCK_M,
            FUSE_DQ, CARRY_DQ, STATS,
        )
    if FUSE_DQ and _TMA_REDUCE and L < 0:  # never taken: torch's kernel-mutation analysis (torch.compile) does not
        tl.store(DQACC, 0.0)  # count TMA reductions (tt.descriptor_reduce) as writes; this store shows it DQACC
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
