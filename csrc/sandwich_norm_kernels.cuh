// Sandwich-norm kernels (device code only; NVRTC-compatible, see common.cuh).
//
//   modulate: y   = x * rstd(x) * (1 + scale[b])                 (GATED = false)
//   gated:    out = residual + tanh(gate[b]) * h * rstd(h)       (GATED = true)
//
// Forward: blockDim.x threads per row hold the whole row in registers (ITEMS_FWD vectors of VEC
// elements each): one read of every input, one write of the output. blockDim.y rows per block.
// Backward: each row group (threadIdx.y) walks rows_per_group consecutive tokens of one batch
// element: dx = rstd * g - x * rstd^3 * sum(g * x) / D with g = dy * coef (coef = 1 + scale or
// tanh(gate)), and accumulates sum(dy * x * rstd) per column in registers; one float32 partial row
// per group is written and summed over groups by the caller (deterministic, no atomics).
#pragma once
#include "common.cuh"

namespace lavin {

constexpr int kItemsFwd = 4;
constexpr int kItemsBwd = 2;

template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(kMaxBlockThreads)
sandwich_fwd_kernel(const T* __restrict__ x, const T* __restrict__ vec, const T* __restrict__ res, T* __restrict__ out,
                    long long rows, long long L, int D, long long sxb, long long sxl, long long svb, long long srb,
                    long long srl, float eps) {
  __shared__ float smem[kMaxWarps];
  const long long row = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < rows;
  const long long b = active ? row / L : 0;
  const long long l = active ? row - b * L : 0;
  const T* xr = x + b * sxb + l * sxl;
  const int nvec = D / VEC;

  float xv[kItemsFwd][VEC];
  float ss[1] = {0.f};
#pragma unroll
  for (int i = 0; i < kItemsFwd; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (active && c < nvec) {
      load_f32<T, VEC>(xr + c * VEC, xv[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss[0] += xv[i][j] * xv[i][j];
    }
  }
  row_sum<1>(ss, smem);
  const float rstd = rsqrtf(ss[0] / D + eps);

  const T* vr = vec + b * svb;
#pragma unroll
  for (int i = 0; i < kItemsFwd; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (active && c < nvec) {
      float v[VEC], o[VEC];
      load_f32<T, VEC>(vr + c * VEC, v);
      if constexpr (GATED) {
        float r[VEC];
        load_f32<T, VEC>(res + b * srb + l * srl + c * VEC, r);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = r[j] + tanhf(v[j]) * (xv[i][j] * rstd);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = xv[i][j] * rstd * (1.f + v[j]);
      }
      store_f32<T, VEC>(out + row * D + c * VEC, o);
    }
  }
}

template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(kMaxBlockThreads)
sandwich_bwd_kernel(const T* __restrict__ x, const T* __restrict__ vec, const T* __restrict__ dy, T* __restrict__ dx,
                    float* __restrict__ partial, long long groups, long long G, long long L, int D, long long sxb,
                    long long sxl, long long svb, long long sdb, long long sdl, float eps, int rows_per_group) {
  __shared__ float smem[kMaxWarps * 2];
  const long long gid = static_cast<long long>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = gid < groups;
  const long long b = active ? gid / G : 0;
  const long long l0 = active ? (gid - b * G) * rows_per_group : 0;
  const int nvec = D / VEC;

  float coef[kItemsBwd][VEC], acc[kItemsBwd][VEC];
#pragma unroll
  for (int i = 0; i < kItemsBwd; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
#pragma unroll
    for (int j = 0; j < VEC; ++j) coef[i][j] = acc[i][j] = 0.f;
    if (active && c < nvec) {
      load_f32<T, VEC>(vec + b * svb + c * VEC, coef[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) coef[i][j] = GATED ? tanhf(coef[i][j]) : 1.f + coef[i][j];
    }
  }

  // Same trip count for every thread of the block (row_sum synchronises); `ok` masks the memory.
  for (int r = 0; r < rows_per_group; ++r) {
    const long long l = l0 + r;
    const bool ok = active && l < L;
    Pack<T, VEC> xp[kItemsBwd], dp[kItemsBwd];  // storage type: fewer registers, more warps per SM
    float s[2] = {0.f, 0.f};                     // sum(x^2), sum(g * x)
#pragma unroll
    for (int i = 0; i < kItemsBwd; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (ok && c < nvec) {
        xp[i] = load_pack<T, VEC>(x + b * sxb + l * sxl + c * VEC);
        dp[i] = load_pack<T, VEC>(dy + b * sdb + l * sdl + c * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xv = to_f32(xp[i].t[j]);
          s[0] += xv * xv;
          s[1] += to_f32(dp[i].t[j]) * coef[i][j] * xv;
        }
      }
    }
    row_sum<2>(s, smem);
    const float rstd = rsqrtf(s[0] / D + eps);
    const float k = rstd * rstd * rstd * s[1] / D;
#pragma unroll
    for (int i = 0; i < kItemsBwd; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (ok && c < nvec) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xv = to_f32(xp[i].t[j]), dv = to_f32(dp[i].t[j]);
          o[j] = rstd * (dv * coef[i][j]) - xv * k;
          acc[i][j] += dv * (xv * rstd);
        }
        store_f32<T, VEC>(dx + (b * L + l) * D + c * VEC, o);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kItemsBwd; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (active && c < nvec) store_floats<VEC>(partial + gid * D + c * VEC, acc[i]);
  }
}

}  // namespace lavin
