// Sandwich-norm kernels (device code only; NVRTC-compatible, see common.cuh).
//
//   modulate: y   = x * rstd(x) * (1 + scale[b])                 (GATED = false)
//   gated:    out = residual + tanh(gate[b]) * h * rstd(h)       (GATED = true)
//
// Forward: blockDim.x threads per row hold the whole row in registers (ITEMS_FWD vectors of VEC
// elements each): one read of every input, one write of the output. blockDim.y rows per block,
// grid-stride over the rows, the per-sample coefficient kept in registers across rows.
// Backward: each row group (threadIdx.y) walks rows_per_group consecutive tokens of one batch
// element: dx = rstd * g - x * rstd^3 * sum(g * x) / D with g = dy * coef (coef = 1 + scale or
// tanh(gate)), and accumulates sum(dy * x * rstd) per column in registers; one float32 partial row
// per group is written and summed over groups by the caller (deterministic, no atomics).
#pragma once
#include "common.cuh"

namespace lavin {

constexpr int kItemsFwd = 4;
constexpr int kItemsBwd = 3;

// Per-sample coefficient of the row's columns: 1 + scale[b] or tanh(gate[b]).
template <typename T, int VEC, int ITEMS, bool GATED>
__device__ __forceinline__ void load_coef(const T* __restrict__ vr, int nvec, float (&coef)[ITEMS][VEC]) {
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < nvec) {
      load_f32<T, VEC>(vr + c * VEC, coef[i]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) coef[i][j] = GATED ? tanhf(coef[i][j]) : 1.f + coef[i][j];
    }
  }
}

template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(kMaxBlockThreads)
sandwich_fwd_kernel(const T* __restrict__ x, const T* __restrict__ vec, const T* __restrict__ res, T* __restrict__ out,
                    long long rows, long long L, int D, long long sxb, long long sxl, long long svb, long long srb,
                    long long srl, float eps) {
  __shared__ float smem[kMaxWarps];
  const int nvec = D / VEC;
  // Grid-stride over rows (the launcher sizes the grid to the resident blocks): the coefficient
  // (tanh(gate) costs ~20 instructions per element) is computed once per batch element a row
  // group meets, not once per row. Same trip count for every thread of a block (row_sum syncs).
  float coef[kItemsFwd][VEC];
  long long coef_b = -1;
  const long long step = static_cast<long long>(gridDim.x) * blockDim.y;
  for (long long base = static_cast<long long>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const long long row = base + threadIdx.y;
    const bool active = row < rows;
    const long long b = active ? row / L : 0;
    const long long l = active ? row - b * L : 0;
    if (active && b != coef_b) {
      load_coef<T, VEC, kItemsFwd, GATED>(vec + b * svb, nvec, coef);
      coef_b = b;
    }
    const T* xr = x + b * sxb + l * sxl;
    float xv[kItemsFwd][VEC];
    Pack<T, VEC> rv[GATED ? kItemsFwd : 1];  // the residual, loaded before the reduction: both rows in flight
    float ss[1] = {0.f};
#pragma unroll
    for (int i = 0; i < kItemsFwd; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (active && c < nvec) {
        load_f32<T, VEC>(xr + c * VEC, xv[i]);
        if constexpr (GATED) rv[i] = load_pack<T, VEC>(res + b * srb + l * srl + c * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss[0] += xv[i][j] * xv[i][j];
      }
    }
    row_sum<1>(ss, smem);
    const float rstd = rsqrtf(ss[0] / D + eps);
#pragma unroll
    for (int i = 0; i < kItemsFwd; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (active && c < nvec) {
        float o[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (GATED) {
            o[j] = to_f32(rv[i].t[j]) + coef[i][j] * (xv[i][j] * rstd);
          } else {
            o[j] = xv[i][j] * rstd * coef[i][j];
          }
        }
        store_f32<T, VEC>(out + row * D + c * VEC, o);
      }
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
  for (int i = 0; i < kItemsBwd; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) coef[i][j] = acc[i][j] = 0.f;
  if (active) load_coef<T, VEC, kItemsBwd, GATED>(vec + b * svb, nvec, coef);  // once per row group

  // Same trip count for every thread of the block (row_sum synchronises); `ok` masks the memory.
  // Row pointers advance by one row stride per token (no 64-bit index products in the loop).
  const T* xr = x + b * sxb + l0 * sxl;
  const T* dr = dy + b * sdb + l0 * sdl;
  T* outr = dx + (b * L + l0) * D;
  for (int r = 0; r < rows_per_group; ++r, xr += sxl, dr += sdl, outr += D) {
    const bool ok = active && l0 + r < L;
    Pack<T, VEC> xp[kItemsBwd], dp[kItemsBwd];  // storage type: fewer registers, more warps per SM
    float s[2] = {0.f, 0.f};                     // sum(x^2), sum(g * x)
#pragma unroll
    for (int i = 0; i < kItemsBwd; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (ok && c < nvec) {
        xp[i] = load_pack<T, VEC>(xr + c * VEC);
        dp[i] = load_pack<T, VEC>(dr + c * VEC);
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
        store_f32<T, VEC>(outr + c * VEC, o);
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
