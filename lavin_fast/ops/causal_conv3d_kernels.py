"""Triton implicit-GEMM forward of the ST-VAE causal 3D convolution (see causal_conv3d.py).

GEMM view: rows M = the T*H*W output positions of one sample (grid axis 1 is the sample, so a
tile never straddles samples and the per-sample norm scale/shift is a vector), columns
N = C_out, reduction K = kt*kh*kw*C_in ordered tap-major (tap = (dt, dh, dw), then channel).
For tap (dt, dh, dw) the input row of output (t, h, w) is (t + dt - (kt-1), h + dh - kh//2,
w + dw - kw//2):
- time < 0: without a cache, clamped to frame 0 (the causal replicated first frame, no padded
  copy); with a cache, read from cache frame (time + kt - 1) instead;
- h or w outside the image: masked to zero *after* the GroupNorm+SiLU prologue, as the published
  code zero-pads the activation.
The K loop is one flat loop over (tap, channel block) so that Triton software-pipelines it
across taps; the activation tile goes through the prologue in float32, is cast to the input
dtype and multiplied with tl.dot (wgmma on Hopper), accumulating in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lavin_fast.ops.group_norm_silu import gn_silu_prologue


@triton.jit
def causal_conv3d_fwd_kernel(
    x_ptr, cache_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
    sp_scale_ptr, sp_shift_ptr, tidx_ptr, SY, SX,
    res_ptr, out_ptr,
    C, H, W, Cout, P, G, CG,
    sxb, sxc, sxt, sxh, sxw,
    scb, scc, sct, sch, scw,
    srb, src, srt, srh, srw,
    ssb, ssc, sst, ssh, ssw,
    sob, soc, sot, soh, sow,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, SPATIAL: tl.constexpr, HAS_CACHE: tl.constexpr,
    HAS_RES: tl.constexpr,
    NUM_CBLK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out[b, n, t, h, w] = bias[n] + sum_{dt,dh,dw,c} w[(dt,dh,dw,c), n] * act(in[b, c, t', h', w']).

    w_ptr: packed weights [KT*KH*KW*C, Cout] row-major in the input dtype.
    mean/rstd: [B, G] float32 statistics, gamma/beta: [C] affine (channel c is in group c // CG),
    read when HAS_NORM: the norm is applied as x * scale + shift with per-channel float32 vectors.
    SPATIAL (with HAS_NORM): the SpatialNormSiLU form instead, scale/shift [B, C, Tz, h, w] float32
    gathered at (t_index[t'], h' // SY, w' // SX) of each source position (strides ss*).
    cache: [B, C, KT-1, H, W] effective-input frames preceding frame 0, read when HAS_CACHE.
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
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout
    offs_k = tl.arange(0, BLOCK_K)

    b64 = b.to(tl.int64)
    x_base = x_ptr + b64 * sxb
    c_base = cache_ptr + b64 * scb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # constexpr trip count (NUM_CBLK = cdiv(C, BLOCK_K)): also keeps the interpreter off runtime ranges
    for kk in range(0, KT * KH * KW * NUM_CBLK):
        tap = kk // NUM_CBLK
        c0 = (kk - tap * NUM_CBLK) * BLOCK_K
        dt = tap // (KH * KW)
        r = tap - dt * (KH * KW)
        dh = r // KW
        dw = r - dh * KW
        ti = t + (dt - (KT - 1))
        hi = h + (dh - KH // 2)
        wi = w + (dw - KW // 2)
        sp_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        offs_c = c0 + offs_k
        c_ok = offs_c < C
        if HAS_CACHE:
            x_ok = sp_ok & (ti >= 0)
        else:
            x_ok = sp_ok
        tx = tl.maximum(ti, 0)  # causal front padding: replicate frame 0 (no padded copy)
        mask = x_ok[:, None] & c_ok[None, :]
        x_off = tx * sxt + hi * sxh + wi * sxw
        v = tl.load(x_base + x_off[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0)
        if HAS_NORM and SPATIAL:
            tz = tl.load(tidx_ptr + tx, mask=x_ok, other=0)
            s_off = (tz * sst + (hi // SY) * ssh + (wi // SX) * ssw)[:, None] + offs_c[None, :] * ssc
            sc2 = tl.load(sp_scale_ptr + b64 * ssb + s_off, mask=mask, other=0.0)
            sh2 = tl.load(sp_shift_ptr + b64 * ssb + s_off, mask=mask, other=0.0)
            act = gn_silu_prologue(v.to(tl.float32), sc2, sh2)
            a = tl.where(mask, act, 0.0).to(x_ptr.dtype.element_ty)
        elif HAS_NORM:
            grp = offs_c // CG
            mu = tl.load(mean_ptr + b * G + grp, mask=c_ok, other=0.0)
            rs = tl.load(rstd_ptr + b * G + grp, mask=c_ok, other=0.0)
            sc = rs * tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            sh = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32) - mu * sc
            act = gn_silu_prologue(v.to(tl.float32), sc[None, :], sh[None, :])
            # zero padding applies to the activation: masked positions stay exactly zero
            a = tl.where(mask, act, 0.0).to(x_ptr.dtype.element_ty)
        else:
            a = v
        if HAS_CACHE:
            from_cache = sp_ok & (ti < 0)
            c_off = (ti + (KT - 1)) * sct + hi * sch + wi * scw
            cv = tl.load(
                c_base + c_off[:, None] + offs_c[None, :] * scc,
                mask=from_cache[:, None] & c_ok[None, :],
                other=0.0,
            )
            a = tl.where(from_cache[:, None], cv, a)
        wt = tl.load(
            w_ptr + (tap * C + offs_c)[:, None] * Cout + offs_n[None, :],
            mask=c_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, wt, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:  # the skip connection, added in float32 before rounding
        r_off = (t * srt + h * srh + w * srw)[:, None] + offs_n[None, :] * src
        acc = acc + tl.load(res_ptr + b64 * srb + r_off, mask=o_mask, other=0.0).to(tl.float32)
    o_off = (t * sot + h * soh + w * sow)[:, None] + offs_n[None, :] * soc
    tl.store(out_ptr + b64 * sob + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
