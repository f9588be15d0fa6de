"""The Triton kernels of the ST-VAE's GroupNorm statistics and fused GroupNorm/SpatialNorm + SiLU pass (their
launchers, references and dispatch are in group_norm_silu.py; the conv's prologue reuses `gn_silu_prologue`)."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover  (no Triton on this platform: the torch backend serves)
    HAVE_TRITON = False
    triton = tl = None
    gn_silu_prologue = _gn_stats_kernel = _gn_stats_combine_kernel = _gn_silu_kernel = None


if HAVE_TRITON:

    @triton.jit
    def gn_silu_prologue(v, scale, shift):
        """silu(v * scale + shift) in float32 (v float32, scale/shift broadcastable)."""
        a = v * scale + shift
        return a / (1.0 + tl.exp(-a))

    @triton.jit
    def _gn_stats_kernel(
        x_ptr, part_ptr,
        C, P, W, HW,
        sxb, sxc, sxt, sxh, sxw,
        TILES: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """Per-channel Welford partials (mean, m2) of rows [s * TILES * BLOCK_P, +TILES * BLOCK_P) of
        sample b; x viewed as [B, P = T*H*W, C]. part: [B, S, 2, C] float32 (mean, m2). The trip
        count is a constexpr (runtime loop bounds break the interpreter with numpy >= 2.4)."""
        b = tl.program_id(0)
        s = tl.program_id(1)
        cb = tl.program_id(2)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        start = s * (TILES * BLOCK_P)
        run_n = 0.0
        run_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        base = x_ptr + b.to(tl.int64) * sxb
        for i in range(0, TILES):
            offs_p = start + i * BLOCK_P + tl.arange(0, BLOCK_P)
            pmask = offs_p < P
            t = offs_p // HW
            hw = offs_p - t * HW
            h = hw // W
            w = hw - h * W
            row = t * sxt + h * sxh + w * sxw
            mask = pmask[:, None] & cmask[None, :]
            v = tl.load(base + row[:, None] + offs_c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
            n_t = tl.sum(pmask.to(tl.float32), axis=0)
            mean_t = tl.sum(v, axis=0) / tl.maximum(n_t, 1.0)
            d = tl.where(mask, v - mean_t[None, :], 0.0)
            m2_t = tl.sum(d * d, axis=0)
            n_new = run_n + n_t
            delta = mean_t - run_mean
            w_new = n_t / tl.maximum(n_new, 1.0)  # an empty tail tile (n_t = 0) changes nothing
            run_mean = run_mean + delta * w_new
            run_m2 = run_m2 + tl.where(n_t > 0, m2_t + delta * delta * (run_n * w_new), 0.0)
            run_n = n_new
        S = tl.num_programs(1)
        out = part_ptr + ((b * S + s) * 2) * C + offs_c
        tl.store(out, run_mean, mask=cmask)
        tl.store(out + C, run_m2, mask=cmask)

    @triton.jit
    def _gn_stats_combine_kernel(
        part_ptr, first_ptr, second_ptr,
        C, G, CG, S, ROWS, P, eps,
        FINALIZE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
    ):  # fmt: skip
        """Merge the per-(split, channel) partials of group (b, g) with Chan's formula: mean is the
        count-weighted mean, m2 = sum(m2_i + n_i (mean_i - mean)^2) (no cancellation). Writes
        (mean, rstd) when FINALIZE, else (mean, m2) for a running state."""
        pid = tl.program_id(0)
        b = pid // G
        g = pid - b * G
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_CG)
        s_ok = offs_s < S
        mask = s_ok[:, None] & (offs_c < CG)[None, :]
        ptrs = part_ptr + ((b * S + offs_s) * 2 * C)[:, None] + (g * CG + offs_c)[None, :]
        mu = tl.load(ptrs, mask=mask, other=0.0)
        m2 = tl.load(ptrs + C, mask=mask, other=0.0)
        n_s = tl.where(s_ok, tl.minimum(ROWS, P - offs_s * ROWS), 0).to(tl.float32)
        n = tl.where(mask, n_s[:, None], 0.0)
        total = tl.sum(tl.sum(n, axis=1), axis=0)
        mean = tl.sum(tl.sum(n * mu, axis=1), axis=0) / total
        d = mu - mean
        m2_all = tl.sum(tl.sum(tl.where(mask, m2 + n * d * d, 0.0), axis=1), axis=0)
        if FINALIZE:
            tl.store(first_ptr + pid, mean)
            tl.store(second_ptr + pid, 1.0 / tl.sqrt(m2_all / total + eps))
        else:
            tl.store(first_ptr + pid, mean)
            tl.store(second_ptr + pid, m2_all)

    @triton.jit
    def _gn_silu_kernel(
        x_ptr, y_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr,
        sp_scale_ptr, sp_shift_ptr, tidx_ptr, SY, SX,
        C, G, CG, P, W, HW,
        sxb, sxc, sxt, sxh, sxw,
        syb, syc, syt, syh, syw,
        ssb, ssc, sst, ssh, ssw,
        SPATIAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        """y = silu((x - mean[b, g]) * rstd[b, g] * gamma[c] + beta[c]), g = c // CG, over x viewed as
        [B, P, C]; y may be a strided view (e.g. the interior of a padded conv input). SPATIAL: the
        SpatialNormSiLU form, scale/shift gathered from the coarse grid (strides ss*) instead."""
        pb = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2)
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        pmask = offs_p < P
        cmask = offs_c < C
        t = offs_p // HW
        hw = offs_p - t * HW
        h = hw // W
        w = hw - h * W
        mask = pmask[:, None] & cmask[None, :]
        b64 = b.to(tl.int64)  # batch offset in int64 on the base pointer; in-sample offsets int32
        xo = (t * sxt + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc
        v = tl.load(x_ptr + b64 * sxb + xo, mask=mask, other=0.0).to(tl.float32)
        if SPATIAL:
            tz = tl.load(tidx_ptr + t, mask=pmask, other=0)
            so = (tz * sst + (h // SY) * ssh + (w // SX) * ssw)[:, None] + offs_c[None, :] * ssc
            sc2 = tl.load(sp_scale_ptr + b64 * ssb + so, mask=mask, other=0.0)
            sh2 = tl.load(sp_shift_ptr + b64 * ssb + so, mask=mask, other=0.0)
            a = gn_silu_prologue(v, sc2, sh2)
        else:
            grp = offs_c // CG
            mu = tl.load(mean_ptr + b * G + grp, mask=cmask, other=0.0)
            sc = tl.load(rstd_ptr + b * G + grp, mask=cmask, other=0.0) * tl.load(
                gamma_ptr + offs_c, mask=cmask, other=0.0
            ).to(tl.float32)
            sh = tl.load(beta_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32) - mu * sc
            a = gn_silu_prologue(v, sc[None, :], sh[None, :])
        yo = (t * syt + h * syh + w * syw)[:, None] + offs_c[None, :] * syc
        tl.store(y_ptr + b64 * syb + yo, a.to(y_ptr.dtype.element_ty), mask=mask)
