// Device helpers shared by the lavin-fast CUDA kernels.
//
// Header-free on purpose: these sources compile both with nvcc (CMake, setup.py) and with NVRTC
// through CuPy at run time, where no CUDA toolkit headers may exist. 16-bit floats are therefore
// plain storage structs converted with PTX `cvt` instructions (sm_80+), and 16-byte vectors are
// moved as the built-in uint4.
#pragma once

namespace lavin {

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(static_cast<unsigned int>(v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
  bf16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
  return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
  return r;
}

// N consecutive elements as float32: one 16-byte load when N * sizeof(T) == 16 (the caller
// guarantees 16-byte alignment), else N scalar loads.
template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    union { uint4 u; T t[N]; } pk;
    pk.u = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(pk.t[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(p[i]);
  }
}

// N consecutive elements kept in their storage type (half the registers of float32 for 16-bit
// types); converted at each use.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T t[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ p) {
  Pack<T, N> pk;
  if constexpr (N * sizeof(T) == 16) {
    union { uint4 u; Pack<T, N> p; } raw;
    raw.u = *reinterpret_cast<const uint4*>(p);
    pk = raw.p;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) pk.t[i] = p[i];
  }
  return pk;
}

template <typename T, int N>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&v)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    union { uint4 u; T t[N]; } pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.t[i] = from_f32<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = pk.u;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_f32<T>(v[i]);
  }
}

// float32 rows: 16-byte stores whenever N is a multiple of 4 (aligned by the caller).
template <int N>
__device__ __forceinline__ void store_floats(float* __restrict__ p, const float (&v)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(p + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = v[i];
  }
}

constexpr int kMaxBlockThreads = 512;
constexpr int kMaxWarps = kMaxBlockThreads / 32;

// Sum NV values over the blockDim.x threads of each row (threadIdx.y picks the row). blockDim.x
// is a power of two <= 32 or a multiple of 32. Every thread of the block must call this (it
// synchronises when a row spans several warps); all threads of a row get the same, fixed-order sum.
template <int NV>
__device__ __forceinline__ void row_sum(float (&v)[NV], float* smem /* [kMaxWarps * NV] */) {
  const int tpr = blockDim.x;
  const int width = tpr < 32 ? tpr : 32;
#pragma unroll
  for (int k = 0; k < NV; ++k)
    for (int o = width >> 1; o > 0; o >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  if (tpr > 32) {
    const int warps_per_row = tpr >> 5;
    const int base = threadIdx.y * warps_per_row;
    __syncthreads();  // the previous call's readers are done with smem
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) smem[(base + (threadIdx.x >> 5)) * NV + k] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float s = 0.f;
      for (int w = 0; w < warps_per_row; ++w) s += smem[(base + w) * NV + k];
      v[k] = s;
    }
  }
}

}  // namespace lavin
