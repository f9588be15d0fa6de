"""Triton implicit-GEMM forward of the ST-VAE causal 3D convolution (see causal_conv3d.py).

GEMM view: rows M = the T*H*W output positions of one sample (grid axis 1 is the sample, so a tile
never straddles samples), columns N = C_out, reduction K = kt*kh*kw*C_in ordered tap-major (tap =
(dt, dh, dw), then channel). The input is the conv's *effective* input (the GroupNorm/SpatialNorm +
SiLU is applied once per element by a separate pass, `group_norm_silu`, before this kernel), so the
K loop is a plain GEMM loop: no per-tap, per-output-block recomputation of the norm.

Loop structure: taps outer, channel blocks inner, flattened into one software-pipelined loop
(`tl.range(..., flatten=True)`), so that the im2col index and mask math (the input row of each output
position for the tap, the causal clamp, the spatial zero padding) is computed once per tap, not once per
K step. For tap (dt, dh, dw) the input row of output (t, h, w) is (t + dt + T_SHIFT, h + dh - kh//2,
w + dw - kw//2), T_SHIFT = PAD - (kt-1) where PAD frames of front (a streaming cache) were prepended to
the input by the launcher:
- time < 0 (no prepended front): clamped to frame 0, the causal replicated first frame (no padded copy);
- h or w outside the image: masked to zero (the published code zero-pads the activation).
Activations are gathered with masked loads (cp.async / LDGSTS when pipelined; TMA cannot express the
clamp and the per-row gather). Weights come by TMA: a tensor descriptor made inside the kernel over the
packed weights [taps, C_in, C_out padded to 8] with block [1, BLOCK_K, BLOCK_N] (out-of-range channels
are zero-filled by the copy engine, so no mask math for them). One tl.dot per K step (wgmma on Hopper),
accumulating in float32; bias and an optional residual are added in the epilogue before rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def causal_conv3d_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    C, H, W, Cout, CoutP, P, T_SHIFT,
    sxb, sxc, sxt, sxh, sxw,
    srb, src, srt, srh, srw,
    sob, soc, sot, soh, sow,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    NUM_CBLK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[b, n, t, h, w] = bias[n] + res[b, n, t, h, w] + sum_{dt,dh,dw,c} w[(dt,dh,dw), c, n] * x[b, c, t', h', w'].

    w_ptr: packed weights [KT*KH*KW, C, CoutP] contiguous in the input dtype (CoutP = Cout rounded up to 8,
    zero columns: the TMA descriptor's row stride must be a multiple of 16 bytes).
    res: [B, Cout, T, H, W] added to the output when HAS_RES.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    HW = H * W
    num_m = tl.cdiv(P, BLOCK_M)
    num_n = tl.cdiv(Cout, BLOCK_N)
    # group GROUP_M row tiles with all column tiles so that the input tiles are reused from L2
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < P
    t = offs_m // HW
    hw = offs_m - t * HW
    h = hw // W
    w = hw - h * W
    offs_k = tl.arange(0, BLOCK_K)
    n0 = pid_n * BLOCK_N

    x_base = x_ptr + b.to(tl.int64) * sxb
    w_desc = tl.make_tensor_descriptor(
        w_ptr, shape=[KT * KH * KW, C, CoutP], strides=[C * CoutP, CoutP, 1], block_shape=[1, BLOCK_K, BLOCK_N]
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in tl.range(0, KT * KH * KW * NUM_CBLK):
        tap = kk // NUM_CBLK
        cb = kk - tap * NUM_CBLK
        dt = tap // (KH * KW)
        r = tap - dt * (KH * KW)
        dh = r // KW
        dw = r - dh * KW
        tx = tl.maximum(t + (dt + T_SHIFT), 0)  # causal front: replicate frame 0 (no padded copy)
        hi = h + (dh - KH // 2)
        wi = w + (dw - KW // 2)
        row_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        row_ptr = x_base + (tx * sxt + hi * sxh + wi * sxw)
        offs_c = cb * BLOCK_K + offs_k
        a = tl.load(row_ptr[:, None] + offs_c[None, :] * sxc, mask=row_ok[:, None] & (offs_c < C)[None, :], other=0.0)
        wt = w_desc.load([tap, cb * BLOCK_K, n0]).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    b64 = b.to(tl.int64)
    if HAS_RES:  # the skip connection, added in float32 before rounding
        r_off = (t * srt + h * srh + w * srw)[:, None] + offs_n[None, :] * src
        acc = acc + tl.load(res_ptr + b64 * srb + r_off, mask=o_mask, other=0.0).to(tl.float32)
    o_off = (t * sot + h * soh + w * sow)[:, None] + offs_n[None, :] * soc
    tl.store(out_ptr + b64 * sob + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
