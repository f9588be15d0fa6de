/* C ABI of liblavin_fast_cpu.so: the J-DiT's memory-bound CPU ops, forward and backward, each in one pass over
 * memory (float32, OpenMP over rows). No torch headers: the library builds with a plain C++ compiler and is
 * loaded with ctypes (lavin_fast/ops/_cpu.py); lavin_fast/ops/cpu_fused.py checks every tensor before a call.
 *
 * Layouts (all contiguous, sizes and offsets in elements):
 *   rows ops: x, h, residual, dy, y, dx [N = B * L, D]; scale, gate, dscale, dgate [B, D]; rstd [N].
 *   swiglu:   gu, dgu [N, 2F] = [gate | up]; y, dy [N, F].
 *   qkv prep: t, dt [B, Ls, (H + 2 Hkv) hd] (a stream's fused q|k|v projection); qk, dqk [B, H + Hkv, Lseg, hd]
 *             and v, dv [B, Hkv, Lseg, hd] (head-major, one attention segment); cos, sin [Lseg, hd];
 *             rstd [B, Ls, 2] (q and k groups); partner [hd] (the column a RoPE pair rotates with), sign [hd]
 *             (-1 on a pair's first half, +1 on its second); dw [(H + Hkv) hd] accumulated (+=).
 * Every pointer must be valid (only qkv_prep_fwd's rstd may be NULL). Every function returns 0, or
 * LAVIN_CPU_ERR_SIZE when a size is not positive or a token range does not fit (nothing is written).
 * nthreads: the OpenMP threads to use (the caller passes torch's intra-op count).
 */
#ifndef LAVIN_FAST_CPU_H
#define LAVIN_FAST_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LAVIN_FAST_CPU_ABI 1

#if defined(__GNUC__)
#define LAVIN_CPU_API __attribute__((visibility("default")))
#else
#define LAVIN_CPU_API
#endif

enum { LAVIN_CPU_OK = 0, LAVIN_CPU_ERR_SIZE = -2 };

LAVIN_CPU_API int lavin_fast_cpu_abi_version(void);
/* "avx512f", "avx2" or "default": the instruction set the row loops were dispatched to on this CPU. */
LAVIN_CPU_API const char* lavin_fast_cpu_isa(void);

/* y = x * rstd * (1 + scale[b]), rstd = 1 / sqrt(mean(x^2) + eps) (saved). */
LAVIN_CPU_API int lavin_cpu_rms_modulate_fwd(const float* x, const float* scale, int64_t B, int64_t L, int64_t D,
                                             float eps, float* y, float* rstd, int nthreads);
/* dx = rstd * (g - xhat * mean(g * xhat)), g = dy * (1 + scale[b]); dscale[b] = sum_l dy * xhat. */
LAVIN_CPU_API int lavin_cpu_rms_modulate_bwd(const float* dy, const float* x, const float* rstd, const float* scale,
                                             int64_t B, int64_t L, int64_t D, float* dx, float* dscale,
                                             int nthreads);

/* out = residual + tanh(gate[b]) * h * rstd (rstd of h saved). */
LAVIN_CPU_API int lavin_cpu_gated_fwd(const float* residual, const float* h, const float* gate, int64_t B, int64_t L,
                                      int64_t D, float eps, float* out, float* rstd, int nthreads);
/* dh = rstd * (g - hn * mean(g * hn)), g = dy * tanh(gate[b]); dgate[b] = sum_l (dy * hn) * (1 - tanh^2). */
LAVIN_CPU_API int lavin_cpu_gated_bwd(const float* dy, const float* h, const float* rstd, const float* gate,
                                      int64_t B, int64_t L, int64_t D, float* dh, float* dgate, int nthreads);

/* y = silu(gate) * up. */
LAVIN_CPU_API int lavin_cpu_swiglu_fwd(const float* gu, int64_t N, int64_t F, float* y, int nthreads);
/* dgate = dy * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))), dup = dy * silu(gate). */
LAVIN_CPU_API int lavin_cpu_swiglu_bwd(const float* dy, const float* gu, int64_t N, int64_t F, float* dgu,
                                       int nthreads);

/* Tokens [tok0, tok0 + ntok) of one stream into rows [row0, row0 + ntok) of a segment: q and k RMS-normed over
 * their group's whole width, times the weights, rotated by RoPE (tables rows row0...), written head-major; v copied
 * head-major. rstd (may be NULL) gets the two groups' factors of those tokens. */
LAVIN_CPU_API int lavin_cpu_qkv_prep_fwd(const float* t, int64_t B, int64_t Ls, int64_t H, int64_t Hkv, int64_t hd,
                                         int64_t tok0, int64_t ntok, const float* qw, const float* kw,
                                         const float* cos, const float* sin, const int32_t* partner,
                                         const float* sign, float eps, float* qk, float* v, int64_t Lseg,
                                         int64_t row0, float* rstd, int nthreads);
/* The transpose: dt of those tokens (q, k and v parts) from dqk and dv; dw += the weights' gradient. */
LAVIN_CPU_API int lavin_cpu_qkv_prep_bwd(const float* dqk, const float* dv, const float* t, const float* rstd,
                                         int64_t B, int64_t Ls, int64_t H, int64_t Hkv, int64_t hd, int64_t tok0,
                                         int64_t ntok, const float* qw, const float* kw, const float* cos,
                                         const float* sin, const int32_t* partner, const float* sign, int64_t Lseg,
                                         int64_t row0, float* dt, float* dw, int nthreads);

#ifdef __cplusplus
}
#endif

#endif /* LAVIN_FAST_CPU_H */
