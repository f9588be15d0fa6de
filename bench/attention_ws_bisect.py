"""What keeps Triton from warp-specialising our attention forward loop on sm_90? (no GPU needed)

Compiles variants of a tutorial-style flash-attention forward loop ahead of time for sm_90 and reports
whether Triton's `tl.range(..., warp_specialize=True)` produced a warp-specialised kernel (a
`ttg.warp_specialize` op in the TTGIR). Each variant adds one feature of lavin_fast's default forward
(`attn_fwd_tma_kernel`): the hd-72 tail tile, the lazy-rescale branch, the partial last key block peeled
after the loop, 8 warps. Run: python -m bench.attention_ws_bisect (about 2 s per variant).
"""

from __future__ import annotations

import itertools
import time

import triton
import triton.language as tl


@triton.jit
def _tile_desc(ptr, L, stride, HD: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    return tl.make_tensor_descriptor(ptr, shape=[L, HD], strides=[stride, 1], block_shape=[ROWS, COLS])


@triton.jit
def _scores(q, qb, kd, kbd, row, D0: tl.constexpr, TAIL: tl.constexpr):
    s = tl.dot(q, kd.load([row, 0]).T)
    if TAIL:
        s = tl.dot(qb, kbd.load([row, D0]).T, s)
    return s


@triton.jit
def bisect_fwd_kernel(
    Q,
    K,
    V,
    O,
    L,
    qk_scale,
    stride,
    HD: tl.constexpr,
    D0: tl.constexpr,
    TAIL: tl.constexpr,
    LAZY: tl.constexpr,
    PEEL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off = tl.program_id(1).to(tl.int64) * L * stride
    q = _tile_desc(Q + off, L, stride, HD, BLOCK_M, D0).load([start_m, 0])
    kd = _tile_desc(K + off, L, stride, HD, BLOCK_N, D0)
    vd = _tile_desc(V + off, L, stride, HD, BLOCK_N, D0)
    qb = tl.zeros([BLOCK_M, 16], q.dtype)
    kbd = kd
    vbd = vd
    if TAIL:
        qb = _tile_desc(Q + off, L, stride, HD, BLOCK_M, 16).load([start_m, D0])
        kbd = _tile_desc(K + off, L, stride, HD, BLOCK_N, 16)
        vbd = _tile_desc(V + off, L, stride, HD, BLOCK_N, 16)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D0], tl.float32)
    acc_b = tl.zeros([BLOCK_M, 16], tl.float32)
    hi = L
    if PEEL:
        hi = (L // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        s = _scores(q, qb, kd, kbd, start_n, D0, TAIL)
        if not PEEL:  # every block masked inside the loop
            s = tl.where((start_n + tl.arange(0, BLOCK_N) < L)[None, :], s, float("-inf"))
        m_blk = tl.max(s, 1) * qk_scale
        if LAZY:  # ours: rescale only when a row max grew by more than 8 (log2 units)
            if tl.max(m_blk - m_i, 0) > 8.0:
                m_new = tl.maximum(m_i, m_blk)
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                acc_b = acc_b * alpha[:, None]
                m_i = m_new
        else:  # the tutorial's (FA2) update on every block
            m_new = tl.maximum(m_i, m_blk)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            acc_b = acc_b * alpha[:, None]
            m_i = m_new
        p = tl.math.exp2(s * qk_scale - m_i[:, None])
        l_i += tl.sum(p, 1)
        p = p.to(q.dtype)
        acc = tl.dot(p, vd.load([start_n, 0]), acc)
        if TAIL:
            acc_b = tl.dot(p, vbd.load([start_n, D0]), acc_b)
    if PEEL and hi < L:  # ours: the partial last block once, after the loop
        s = _scores(q, qb, kd, kbd, hi, D0, TAIL)
        s = tl.where((hi + tl.arange(0, BLOCK_N) < L)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), vd.load([hi, 0]), acc * alpha[:, None])
        if TAIL:
            acc_b = tl.dot(p.to(q.dtype), vbd.load([hi, D0]), acc_b * alpha[:, None])
    rows = start_m + tl.arange(0, BLOCK_M)
    o = O + off + rows[:, None] * stride
    tl.store(o + tl.arange(0, D0)[None, :], (acc / l_i[:, None]).to(q.dtype), mask=(rows < L)[:, None])
    if TAIL:
        cols = D0 + tl.arange(0, 16)
        tl.store(o + cols[None, :], (acc_b / l_i[:, None]).to(q.dtype), mask=(rows < L)[:, None] & (cols < HD)[None, :])


def warp_specialised(hd: int, lazy: bool, peel: bool, num_warps: int) -> bool:
    """Compile one variant for sm_90 (bf16, 128 x 64 tiles, 3 stages); True if Triton warp-specialised it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {"HD": hd, "D0": 128 if hd > 72 else 64, "TAIL": hd == 72, "LAZY": lazy, "PEEL": peel,
              "BLOCK_M": 128, "BLOCK_N": 64}  # fmt: skip
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "L": "i32", "qk_scale": "fp32", "stride": "i32",
           **dict.fromkeys(consts, "constexpr")}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6)}
    src = ASTSource(fn=bisect_fwd_kernel, signature=sig, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})
    return "ttg.warp_specialize" in compiled.asm["ttgir"]


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90: is tl.range(..., warp_specialize=True) applied?")
    print("| hd | lazy rescale | peeled last block | warps | warp-specialised |")
    print("|---|---|---|---|---|")
    for hd, lazy, peel, warps in itertools.product((64, 72), (False, True), (False, True), (4, 8)):
        t0 = time.perf_counter()
        try:
            ws = "yes" if warp_specialised(hd, lazy, peel, warps) else "no"
        except Exception as exc:  # a variant that does not compile is a finding too
            ws = f"does not compile: {type(exc).__name__}"
        print(f"| {hd} | {'yes' if lazy else 'no'} | {'yes' if peel else 'no'} | {warps} | {ws} |"
              f" <!-- {time.perf_counter() - t0:.1f} s -->", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
