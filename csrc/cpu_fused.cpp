// liblavin_fast_cpu.so: the J-DiT's memory-bound CPU ops (lavin_fast_cpu.h), forward and backward in one pass each.
//
// Why: on the CPU the demo's tiny J-DiT spends about half of a training step in these ops, each a chain of
// 4-10 eager torch calls over the same rows (norm, scale, gate, RoPE, layout copies). Here each is one loop over
// rows that reads its inputs once and writes its outputs once; the column sums (dscale, dgate, dw) go to per-thread
// partials summed at the end. The references these are tested against are the torch forms in lavin_fast/ops/
// (tests/test_cpu_fused.py, float64 autograd).
//
// Threads: OpenMP, with the count the caller passes (torch's); linked against the libgomp torch already loaded.
// Vector width: the row loops are compiled for AVX-512, AVX2 and baseline x86-64 and the loader picks one per CPU
// (GCC's target_clones), so one build serves any x86-64 machine; other architectures get one baseline build.
#include "lavin_fast_cpu.h"

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LAVIN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LAVIN_CLONES
#endif

namespace {

// The rows [lo, hi) of N that thread `tid` of `n` takes (contiguous blocks: each thread's partials are its own).
inline void row_range(int64_t N, int tid, int n, int64_t* lo, int64_t* hi) {
  *lo = N * tid / n;
  *hi = N * (tid + 1) / n;
}

inline int clamp_threads(int nthreads, int64_t rows) {
  if (nthreads < 1) nthreads = 1;
  if (rows < nthreads) nthreads = static_cast<int>(rows > 0 ? rows : 1);
  return nthreads;
}

// Sums per-thread partials [n, M] into out[M] (+= when accumulate).
void reduce_partials(const std::vector<float>& part, int n, int64_t M, float* out, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    double acc = accumulate ? out[m] : 0.0;
    for (int t = 0; t < n; ++t) acc += part[static_cast<size_t>(t) * M + m];
    out[m] = static_cast<float>(acc);
  }
}

// exp(x) for float32 in a form the compiler vectorizes (libm's expf is a scalar call inside a loop): x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n through the exponent bits. Relative error ~1e-7 (tested
// through SiLU against float64); inputs clamped to [-87, 88] (float32's normal range: sigmoid saturates anyway).
inline float exp_f32(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  // round to nearest by the 1.5 * 2^23 shifter (floorf is a library call in the baseline clone, which stops
  // vectorisation); the shifted value's low mantissa bits are then n itself
  const float shifted = x * 1.44269504088896341f + 12582912.f;
  const float n = shifted - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits;
  __builtin_memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;
  float two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

LAVIN_CLONES float sum_squares(const float* x, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// The two sandwich norms are one row op: out = [residual +] factor[b] * x * rstd, with factor = 1 + scale
// (rms_norm_modulate) or tanh(gate) (gated_rms_norm_residual), computed once per call into a [B, D] array.
// Backward (the same for both): g = dy * factor, dx = rstd * (g - xhat * mean(g * xhat)), and the column sum
// sum_l dy * xhat per sample, which is d(scale) as it is and d(gate) after the factor 1 - tanh^2.
// ---------------------------------------------------------------------------------------------------------------
template <bool kResidual>
LAVIN_CLONES void norm_fwd_rows(const float* x, const float* factor, const float* residual, int64_t L, int64_t D,
                                float eps, float* y, float* rstd, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* xr = x + r * D;
    const float* f = factor + (r / L) * D;
    float* yr = y + r * D;
    const float rs = 1.f / std::sqrt(sum_squares(xr, D) / static_cast<float>(D) + eps);
    rstd[r] = rs;
    if (kResidual) {
      const float* res = residual + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = res[d] + f[d] * (xr[d] * rs);
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * rs * f[d];
    }
  }
}

LAVIN_CLONES void norm_bwd_rows(const float* dy, const float* x, const float* rstd, const float* factor, int64_t L,
                                int64_t D, float* dx, float* colsum_part, int64_t lo, int64_t hi) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / L;
    const float* xr = x + r * D;
    const float* dyr = dy + r * D;
    const float* f = factor + b * D;
    float* cs = colsum_part + b * D;
    float* dxr = dx + r * D;
    const float rs = rstd[r];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) {
      const float xh = xr[d] * rs;
      cs[d] += dyr[d] * xh;
      dot += dyr[d] * f[d] * xh;
    }
    const float c = dot * inv_d;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dxr[d] = rs * (dyr[d] * f[d] - xr[d] * rs * c);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------------------------------------------
LAVIN_CLONES void swiglu_fwd_rows(const float* gu, int64_t F, float* y, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* g = gu + r * 2 * F;
    const float* u = g + F;
    float* yr = y + r * F;
    // (g * u) * sg, not g / (1 + e) * u: GCC then blends the clamp's lanes with a merge-masked multiply whose
    // destination carries from one iteration to the next, which serialised the divisions (4x slower, measured)
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float sg = 1.f / (1.f + exp_f32(-g[f]));
      yr[f] = (g[f] * u[f]) * sg;
    }
  }
}

LAVIN_CLONES void swiglu_bwd_rows(const float* dy, const float* gu, int64_t F, float* dgu, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const float* g = gu + r * 2 * F;
    const float* u = g + F;
    const float* dyr = dy + r * F;
    float* dg = dgu + r * 2 * F;
    float* du = dg + F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      const float sg = 1.f / (1.f + exp_f32(-g[f]));
      dg[f] = dyr[f] * u[f] * sg * (1.f + g[f] * (1.f - sg));
      du[f] = dyr[f] * g[f] * sg;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// QK RMSNorm (per group, over the group's whole width) * weight, 3D RoPE, head-major layout; v head-major.
// ---------------------------------------------------------------------------------------------------------------
struct QkvGeom {
  int64_t B, Ls, H, Hkv, hd, tok0, ntok, Lseg, row0;
  int64_t width() const { return (H + 2 * Hkv) * hd; }
};

LAVIN_CLONES void qkv_fwd_rows(const QkvGeom& g, const float* t, const float* qw, const float* kw, const float* cos,
                               const float* sin, const int32_t* partner, const float* sign, float eps, float* qk,
                               float* v, float* rstd, float* tmp, int64_t lo, int64_t hi) {
  const int64_t hd = g.hd, nq = g.H * hd, nk = g.Hkv * hd;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / g.ntok, i = r % g.ntok, tok = g.tok0 + i, row = g.row0 + i;
    const float* tr = t + (b * g.Ls + tok) * g.width();
    const float rq = 1.f / std::sqrt(sum_squares(tr, nq) / static_cast<float>(nq) + eps);
    const float rk = 1.f / std::sqrt(sum_squares(tr + nq, nk) / static_cast<float>(nk) + eps);
    if (rstd) {
      rstd[(b * g.Ls + tok) * 2] = rq;
      rstd[(b * g.Ls + tok) * 2 + 1] = rk;
    }
    const float* c = cos + row * hd;
    const float* s = sin + row * hd;
    for (int64_t hh = 0; hh < g.H + g.Hkv; ++hh) {
      const bool is_q = hh < g.H;
      const float* xr = tr + hh * hd;
      const float* w = is_q ? qw + hh * hd : kw + (hh - g.H) * hd;
      const float rs = is_q ? rq : rk;
#pragma omp simd
      for (int64_t j = 0; j < hd; ++j) tmp[j] = xr[j] * rs * w[j];
      float* o = qk + ((b * (g.H + g.Hkv) + hh) * g.Lseg + row) * hd;
#pragma omp simd
      for (int64_t j = 0; j < hd; ++j) o[j] = tmp[j] * c[j] + sign[j] * tmp[partner[j]] * s[j];
    }
    for (int64_t kh = 0; kh < g.Hkv; ++kh)
      std::memcpy(v + ((b * g.Hkv + kh) * g.Lseg + row) * hd, tr + nq + nk + kh * hd, sizeof(float) * hd);
  }
}

LAVIN_CLONES void qkv_bwd_rows(const QkvGeom& g, const float* dqk, const float* dv, const float* t, const float* rstd,
                               const float* qw, const float* kw, const float* cos, const float* sin,
                               const int32_t* partner, const float* sign, float* dt, float* dw_part, float* gx,
                               int64_t lo, int64_t hi) {
  const int64_t hd = g.hd, nq = g.H * hd, nk = g.Hkv * hd, nh = g.H + g.Hkv;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t b = r / g.ntok, i = r % g.ntok, tok = g.tok0 + i, row = g.row0 + i;
    const float* tr = t + (b * g.Ls + tok) * g.width();
    float* dtr = dt + (b * g.Ls + tok) * g.width();
    const float rq = rstd[(b * g.Ls + tok) * 2], rk = rstd[(b * g.Ls + tok) * 2 + 1];
    const float* c = cos + row * hd;
    const float* s = sin + row * hd;
    float dot_q = 0.f, dot_k = 0.f;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const bool is_q = hh < g.H;
      const float* gy = dqk + ((b * nh + hh) * g.Lseg + row) * hd;
      const float* xr = tr + hh * hd;
      const float* w = is_q ? qw + hh * hd : kw + (hh - g.H) * hd;
      const float rs = is_q ? rq : rk;
      float* gxh = gx + hh * hd;
      float* dwh = dw_part + hh * hd;
      float dot = 0.f;
      // RoPE's transpose is the rotation by the opposite angle (a pair's columns share one frequency)
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < hd; ++j) {
        const float gr = gy[j] * c[j] - sign[j] * gy[partner[j]] * s[j];
        const float xh = xr[j] * rs;
        dwh[j] += gr * xh;
        const float gxn = gr * w[j];
        gxh[j] = gxn;
        dot += gxn * xh;
      }
      if (is_q) dot_q += dot; else dot_k += dot;
    }
    const float cq = dot_q / static_cast<float>(nq), ck = dot_k / static_cast<float>(nk);
#pragma omp simd
    for (int64_t j = 0; j < nq; ++j) dtr[j] = rq * (gx[j] - tr[j] * rq * cq);
#pragma omp simd
    for (int64_t j = nq; j < nq + nk; ++j) dtr[j] = rk * (gx[j] - tr[j] * rk * ck);
    for (int64_t kh = 0; kh < g.Hkv; ++kh)
      std::memcpy(dtr + nq + nk + kh * hd, dv + ((b * g.Hkv + kh) * g.Lseg + row) * hd, sizeof(float) * hd);
  }
}

}  // namespace

extern "C" {

int lavin_fast_cpu_abi_version(void) { return LAVIN_FAST_CPU_ABI; }

const char* lavin_fast_cpu_isa(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "default";
}

}  // extern "C"

namespace {

std::vector<float> modulate_factor(const float* scale, int64_t n) {
  std::vector<float> f(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) f[k] = 1.f + scale[k];
  return f;
}

std::vector<float> gate_factor(const float* gate, int64_t n) {
  std::vector<float> f(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) f[k] = std::tanh(gate[k]);
  return f;
}

int norm_fwd(const float* x, const float* factor, const float* residual, int64_t B, int64_t L, int64_t D, float eps,
             float* y, float* rstd, int nthreads) {
  const int64_t N = B * L;
  const int nt = clamp_threads(nthreads, N);
#pragma omp parallel num_threads(nt)
  {
    int64_t lo, hi;
    row_range(N, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    if (residual)
      norm_fwd_rows<true>(x, factor, residual, L, D, eps, y, rstd, lo, hi);
    else
      norm_fwd_rows<false>(x, factor, nullptr, L, D, eps, y, rstd, lo, hi);
  }
  return LAVIN_CPU_OK;
}

// dx and the column sums (into colsum [B, D]).
int norm_bwd(const float* dy, const float* x, const float* rstd, const float* factor, int64_t B, int64_t L, int64_t D,
             float* dx, float* colsum, int nthreads) {
  const int64_t N = B * L;
  const int nt = clamp_threads(nthreads, N);
  std::vector<float> part(static_cast<size_t>(nt) * B * D, 0.f);
  int used = nt;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    if (tid == 0) used = n;
    int64_t lo, hi;
    row_range(N, tid, n, &lo, &hi);
    norm_bwd_rows(dy, x, rstd, factor, L, D, dx, part.data() + static_cast<size_t>(tid) * B * D, lo, hi);
  }
  reduce_partials(part, used, B * D, colsum, false);
  return LAVIN_CPU_OK;
}

}  // namespace

extern "C" {

int lavin_cpu_rms_modulate_fwd(const float* x, const float* scale, int64_t B, int64_t L, int64_t D, float eps,
                               float* y, float* rstd, int nthreads) {
  if (B <= 0 || L <= 0 || D <= 0) return LAVIN_CPU_ERR_SIZE;
  return norm_fwd(x, modulate_factor(scale, B * D).data(), nullptr, B, L, D, eps, y, rstd, nthreads);
}

int lavin_cpu_rms_modulate_bwd(const float* dy, const float* x, const float* rstd, const float* scale, int64_t B,
                               int64_t L, int64_t D, float* dx, float* dscale, int nthreads) {
  if (B <= 0 || L <= 0 || D <= 0) return LAVIN_CPU_ERR_SIZE;
  return norm_bwd(dy, x, rstd, modulate_factor(scale, B * D).data(), B, L, D, dx, dscale, nthreads);
}

int lavin_cpu_gated_fwd(const float* residual, const float* h, const float* gate, int64_t B, int64_t L, int64_t D,
                        float eps, float* out, float* rstd, int nthreads) {
  if (B <= 0 || L <= 0 || D <= 0) return LAVIN_CPU_ERR_SIZE;
  return norm_fwd(h, gate_factor(gate, B * D).data(), residual, B, L, D, eps, out, rstd, nthreads);
}

int lavin_cpu_gated_bwd(const float* dy, const float* h, const float* rstd, const float* gate, int64_t B, int64_t L,
                        int64_t D, float* dh, float* dgate, int nthreads) {
  if (B <= 0 || L <= 0 || D <= 0) return LAVIN_CPU_ERR_SIZE;
  const std::vector<float> tg = gate_factor(gate, B * D);
  norm_bwd(dy, h, rstd, tg.data(), B, L, D, dh, dgate, nthreads);
  for (int64_t k = 0; k < B * D; ++k) dgate[k] *= 1.f - tg[k] * tg[k];
  return LAVIN_CPU_OK;
}

int lavin_cpu_swiglu_fwd(const float* gu, int64_t N, int64_t F, float* y, int nthreads) {
  if (N <= 0 || F <= 0) return LAVIN_CPU_ERR_SIZE;
  const int nt = clamp_threads(nthreads, N);
#pragma omp parallel num_threads(nt)
  {
    int64_t lo, hi;
    row_range(N, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    swiglu_fwd_rows(gu, F, y, lo, hi);
  }
  return LAVIN_CPU_OK;
}

int lavin_cpu_swiglu_bwd(const float* dy, const float* gu, int64_t N, int64_t F, float* dgu, int nthreads) {
  if (N <= 0 || F <= 0) return LAVIN_CPU_ERR_SIZE;
  const int nt = clamp_threads(nthreads, N);
#pragma omp parallel num_threads(nt)
  {
    int64_t lo, hi;
    row_range(N, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    swiglu_bwd_rows(dy, gu, F, dgu, lo, hi);
  }
  return LAVIN_CPU_OK;
}

int lavin_cpu_qkv_prep_fwd(const float* t, int64_t B, int64_t Ls, int64_t H, int64_t Hkv, int64_t hd, int64_t tok0,
                           int64_t ntok, const float* qw, const float* kw, const float* cos, const float* sin,
                           const int32_t* partner, const float* sign, float eps, float* qk, float* v, int64_t Lseg,
                           int64_t row0, float* rstd, int nthreads) {
  if (B <= 0 || Ls <= 0 || H <= 0 || Hkv <= 0 || hd <= 0 || ntok <= 0 || Lseg <= 0 || tok0 < 0 || row0 < 0 ||
      tok0 + ntok > Ls || row0 + ntok > Lseg)
    return LAVIN_CPU_ERR_SIZE;
  const QkvGeom g{B, Ls, H, Hkv, hd, tok0, ntok, Lseg, row0};
  const int64_t N = B * ntok;
  const int nt = clamp_threads(nthreads, N);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> tmp(static_cast<size_t>(hd));
    int64_t lo, hi;
    row_range(N, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
    qkv_fwd_rows(g, t, qw, kw, cos, sin, partner, sign, eps, qk, v, rstd, tmp.data(), lo, hi);
  }
  return LAVIN_CPU_OK;
}

int lavin_cpu_qkv_prep_bwd(const float* dqk, const float* dv, const float* t, const float* rstd, int64_t B,
                           int64_t Ls, int64_t H, int64_t Hkv, int64_t hd, int64_t tok0, int64_t ntok,
                           const float* qw, const float* kw, const float* cos, const float* sin,
                           const int32_t* partner, const float* sign, int64_t Lseg, int64_t row0, float* dt,
                           float* dw, int nthreads) {
  if (B <= 0 || Ls <= 0 || H <= 0 || Hkv <= 0 || hd <= 0 || ntok <= 0 || Lseg <= 0 || tok0 < 0 || row0 < 0 ||
      tok0 + ntok > Ls || row0 + ntok > Lseg)
    return LAVIN_CPU_ERR_SIZE;
  const QkvGeom g{B, Ls, H, Hkv, hd, tok0, ntok, Lseg, row0};
  const int64_t N = B * ntok, M = (H + Hkv) * hd;
  const int nt = clamp_threads(nthreads, N);
  std::vector<float> part(static_cast<size_t>(nt) * M, 0.f);
  int used = nt;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), n = omp_get_num_threads();
    if (tid == 0) used = n;
    std::vector<float> gx(static_cast<size_t>(M));
    int64_t lo, hi;
    row_range(N, tid, n, &lo, &hi);
    qkv_bwd_rows(g, dqk, dv, t, rstd, qw, kw, cos, sin, partner, sign, dt, part.data() + static_cast<size_t>(tid) * M,
                 gx.data(), lo, hi);
  }
  if (dw) reduce_partials(part, used, M, dw, true);
  return LAVIN_CPU_OK;
}

}  // extern "C"
