// Host launchers of the sandwich-norm kernels (C ABI, see lavin_fast_cuda.h).
// The launch configuration rule is mirrored in lavin_fast/ops/_cuda.py (CuPy/NVRTC path): keep both in step.
// The forward kernel is a grid-stride loop: this launcher runs as many blocks as are resident at once
// (each row group then keeps its 1 + scale / tanh(gate) across the rows it meets); a grid of one
// block per row group (the CuPy path) gives the same result, with the coefficient recomputed per row.
#include <cuda_runtime.h>

#include "lavin_fast_cuda.h"
#include "sandwich_norm_kernels.cuh"

namespace {

using lavin::kItemsBwd;
using lavin::kItemsFwd;
using lavin::kMaxBlockThreads;

struct Config {
  int vec;              // elements per vector access
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
};

int elem_size(int dtype) { return dtype == LAVIN_F32 ? 4 : 2; }

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Vector width: 16 bytes when D, every row stride and every pointer allow it, else 1.
int pick_vec(int dtype, int64_t D, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  const int v = 16 / elem_size(dtype);
  if (D % v) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  for (int64_t s : strides)
    if (s % v) return 1;
  return v;
}

// Threads per row: a power of two up to 32, else a multiple of 32, so that items * threads
// covers the row's vectors; -1 if the row needs more than kMaxBlockThreads threads.
Config make_config(int64_t D, int vec, int items) {
  const int64_t nvec = D / vec;
  const int64_t need = (nvec + items - 1) / items;
  int tpr = 1;
  if (need <= 32) {
    while (tpr < need) tpr <<= 1;
  } else {
    tpr = static_cast<int>((need + 31) / 32 * 32);
  }
  if (need > kMaxBlockThreads) return {vec, -1, 0};
  const int rpb = tpr >= 128 ? 1 : 128 / tpr;  // at least 128 threads per block
  return {vec, tpr, rpb};
}

int check_sizes(int64_t B, int64_t L, int64_t D) {
  if (B < 0 || L < 0 || D < 1 || D > (1 << 30)) return LAVIN_ERR_SIZE;
  return LAVIN_OK;
}

int launched() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? LAVIN_OK : static_cast<int>(e);
}

// Blocks of `kernel` resident on the current device at once (at least 1): the forward's grid-stride
// loop runs exactly that many, so that each row group keeps its coefficient across many rows.
template <typename K>
int64_t resident_blocks(K kernel, int threads) {
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch reports any real problem
    return 1 << 20;      // unknown: one row group per row, as without the cap
  }
  return static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
}

template <typename T, int V, bool GATED>
int launch_fwd(const T* xp, const T* vp, const T* rp, T* op, int64_t rows, int64_t L, int64_t D, const Config& c,
               int64_t sxb, int64_t sxl, int64_t svb, int64_t srb, int64_t srl, float eps, cudaStream_t stream) {
  const auto kernel = lavin::sandwich_fwd_kernel<T, V, GATED>;
  const dim3 block(c.threads_per_row, c.rows_per_block);
  const int64_t needed = (rows + c.rows_per_block - 1) / c.rows_per_block;
  const int64_t cap = resident_blocks(kernel, c.threads_per_row * c.rows_per_block);
  const dim3 grid(static_cast<unsigned>(needed < cap ? needed : cap));
  kernel<<<grid, block, 0, stream>>>(xp, vp, rp, op, rows, L, static_cast<int>(D), sxb, sxl, svb, srb, srl, eps);
  return launched();
}

template <typename T, bool GATED>
int fwd(const void* x, const void* vec, const void* res, void* out, int64_t B, int64_t L, int64_t D, int64_t sxb,
        int64_t sxl, int64_t svb, int64_t srb, int64_t srl, float eps, cudaStream_t stream, int dtype) {
  const int v = pick_vec(dtype, D, {x, vec, res, out}, {sxb, sxl, svb, srb, srl});
  // One width limit for forward and backward (the backward's), so that an op never half-works.
  if (D > static_cast<int64_t>(kMaxBlockThreads) * kItemsBwd * v) return LAVIN_ERR_TOO_WIDE;
  const Config c = make_config(D, v, kItemsFwd);
  if (c.threads_per_row < 0) return LAVIN_ERR_TOO_WIDE;
  const int64_t rows = B * L;
  if (rows == 0) return LAVIN_OK;
  const T* xp = static_cast<const T*>(x);
  const T* vp = static_cast<const T*>(vec);
  const T* rp = static_cast<const T*>(res);
  T* op = static_cast<T*>(out);
  constexpr int V = 16 / sizeof(T);
  if (v == V) return launch_fwd<T, V, GATED>(xp, vp, rp, op, rows, L, D, c, sxb, sxl, svb, srb, srl, eps, stream);
  return launch_fwd<T, 1, GATED>(xp, vp, rp, op, rows, L, D, c, sxb, sxl, svb, srb, srl, eps, stream);
}

template <typename T, bool GATED>
int bwd(const void* x, const void* vec, const void* dy, void* dx, float* partial, int64_t B, int64_t L, int64_t D,
        int64_t sxb, int64_t sxl, int64_t svb, int64_t sdb, int64_t sdl, float eps, int64_t rows_per_group,
        cudaStream_t stream, int dtype) {
  if (rows_per_group < 1 || rows_per_group > (1 << 20)) return LAVIN_ERR_SIZE;
  const int v = pick_vec(dtype, D, {x, vec, dy, dx, partial}, {sxb, sxl, svb, sdb, sdl});
  const Config c = make_config(D, v, kItemsBwd);
  if (c.threads_per_row < 0) return LAVIN_ERR_TOO_WIDE;
  const int64_t G = (L + rows_per_group - 1) / rows_per_group;
  const int64_t groups = B * G;
  if (groups == 0) return LAVIN_OK;
  const dim3 block(c.threads_per_row, c.rows_per_block);
  const dim3 grid(static_cast<unsigned>((groups + c.rows_per_block - 1) / c.rows_per_block));
  const T* xp = static_cast<const T*>(x);
  const T* vp = static_cast<const T*>(vec);
  const T* dp = static_cast<const T*>(dy);
  T* op = static_cast<T*>(dx);
  const int rpg = static_cast<int>(rows_per_group);
  constexpr int V = 16 / sizeof(T);
  if (v == V) {
    lavin::sandwich_bwd_kernel<T, V, GATED><<<grid, block, 0, stream>>>(
        xp, vp, dp, op, partial, groups, G, L, static_cast<int>(D), sxb, sxl, svb, sdb, sdl, eps, rpg);
  } else {
    lavin::sandwich_bwd_kernel<T, 1, GATED><<<grid, block, 0, stream>>>(
        xp, vp, dp, op, partial, groups, G, L, static_cast<int>(D), sxb, sxl, svb, sdb, sdl, eps, rpg);
  }
  return launched();
}

template <typename T>
int modulate_fwd(const void* x, const void* s, void* y, int64_t B, int64_t L, int64_t D, int64_t sxb,
                        int64_t sxl, int64_t ssb, float eps, cudaStream_t st, int dtype) {
  return fwd<T, false>(x, s, nullptr, y, B, L, D, sxb, sxl, ssb, 0, 0, eps, st, dtype);
}
template <typename T>
int gated_fwd(const void* r, const void* h, const void* g, void* out, int64_t B, int64_t L, int64_t D,
                     int64_t srb, int64_t srl, int64_t shb, int64_t shl, int64_t sgb, float eps, cudaStream_t st,
                     int dtype) {
  return fwd<T, true>(h, g, r, out, B, L, D, shb, shl, sgb, srb, srl, eps, st, dtype);
}
template <typename T>
int modulate_bwd(const void* x, const void* s, const void* dy, void* dx, float* part, int64_t B, int64_t L,
                        int64_t D, int64_t sxb, int64_t sxl, int64_t ssb, int64_t sdb, int64_t sdl, float eps,
                        int64_t rpg, cudaStream_t st, int dtype) {
  return bwd<T, false>(x, s, dy, dx, part, B, L, D, sxb, sxl, ssb, sdb, sdl, eps, rpg, st, dtype);
}
template <typename T>
int gated_bwd(const void* h, const void* g, const void* dout, void* dh, float* part, int64_t B, int64_t L,
                     int64_t D, int64_t shb, int64_t shl, int64_t sgb, int64_t sdb, int64_t sdl, float eps,
                     int64_t rpg, cudaStream_t st, int dtype) {
  return bwd<T, true>(h, g, dout, dh, part, B, L, D, shb, shl, sgb, sdb, sdl, eps, rpg, st, dtype);
}

}  // namespace

extern "C" {

int lavin_fast_cuda_abi_version(void) { return LAVIN_FAST_CUDA_ABI; }

const char* lavin_fast_cuda_error_string(int code) {
  switch (code) {
    case LAVIN_OK: return "ok";
    case LAVIN_ERR_DTYPE: return "unknown dtype code (0 float32, 1 float16, 2 bfloat16)";
    case LAVIN_ERR_SIZE: return "invalid size (B, L >= 0, D >= 1, rows_per_group >= 1)";
    case LAVIN_ERR_TOO_WIDE: return "D exceeds the widest row the kernels hold (lavin_sandwich_norm_max_d)";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

int64_t lavin_sandwich_norm_max_d(int dtype, int vectorized) {
  if (dtype != LAVIN_F32 && dtype != LAVIN_F16 && dtype != LAVIN_BF16) return 0;
  const int64_t vec = vectorized ? 16 / elem_size(dtype) : 1;
  return static_cast<int64_t>(kMaxBlockThreads) * kItemsBwd * vec;  // the backward holds the fewer items
}

int lavin_sandwich_norm_config(int64_t D, int vec, int backward, int* threads_per_row, int* rows_per_block) {
  if (D < 1 || (vec != 1 && vec != 4 && vec != 8) || D % vec) return LAVIN_ERR_SIZE;
  const Config c = make_config(D, vec, backward ? kItemsBwd : kItemsFwd);
  if (c.threads_per_row < 0) return LAVIN_ERR_TOO_WIDE;
  if (threads_per_row) *threads_per_row = c.threads_per_row;
  if (rows_per_block) *rows_per_block = c.rows_per_block;
  return LAVIN_OK;
}

#define LAVIN_DISPATCH(dtype, FN, ...)                                      \
  switch (dtype) {                                                          \
    case LAVIN_F32: return FN<float>(__VA_ARGS__);                          \
    case LAVIN_F16: return FN<lavin::f16>(__VA_ARGS__);                     \
    case LAVIN_BF16: return FN<lavin::bf16>(__VA_ARGS__);                   \
    default: return LAVIN_ERR_DTYPE;                                        \
  }

int lavin_rms_norm_modulate_fwd(int dtype, const void* x, const void* scale, void* y, int64_t B, int64_t L, int64_t D,
                                int64_t stride_xb, int64_t stride_xl, int64_t stride_sb, float eps,
                                lavin_stream_t stream) {
  if (int e = check_sizes(B, L, D)) return e;
  LAVIN_DISPATCH(dtype, modulate_fwd, x, scale, y, B, L, D, stride_xb, stride_xl, stride_sb, eps, stream, dtype)
}

int lavin_rms_norm_modulate_bwd(int dtype, const void* x, const void* scale, const void* dy, void* dx, float* partial,
                                int64_t B, int64_t L, int64_t D, int64_t stride_xb, int64_t stride_xl,
                                int64_t stride_sb, int64_t stride_dyb, int64_t stride_dyl, float eps,
                                int64_t rows_per_group, lavin_stream_t stream) {
  if (int e = check_sizes(B, L, D)) return e;
  LAVIN_DISPATCH(dtype, modulate_bwd, x, scale, dy, dx, partial, B, L, D, stride_xb, stride_xl, stride_sb,
                 stride_dyb, stride_dyl, eps, rows_per_group, stream, dtype)
}

int lavin_gated_rms_norm_residual_fwd(int dtype, const void* residual, const void* h, const void* gate, void* out,
                                      int64_t B, int64_t L, int64_t D, int64_t stride_rb, int64_t stride_rl,
                                      int64_t stride_hb, int64_t stride_hl, int64_t stride_gb, float eps,
                                      lavin_stream_t stream) {
  if (int e = check_sizes(B, L, D)) return e;
  LAVIN_DISPATCH(dtype, gated_fwd, residual, h, gate, out, B, L, D, stride_rb, stride_rl, stride_hb, stride_hl,
                 stride_gb, eps, stream, dtype)
}

int lavin_gated_rms_norm_residual_bwd(int dtype, const void* h, const void* gate, const void* dout, void* dh,
                                      float* partial, int64_t B, int64_t L, int64_t D, int64_t stride_hb,
                                      int64_t stride_hl, int64_t stride_gb, int64_t stride_db, int64_t stride_dl,
                                      float eps, int64_t rows_per_group, lavin_stream_t stream) {
  if (int e = check_sizes(B, L, D)) return e;
  LAVIN_DISPATCH(dtype, gated_bwd, h, gate, dout, dh, partial, B, L, D, stride_hb, stride_hl, stride_gb, stride_db,
                 stride_dl, eps, rows_per_group, stream, dtype)
}

}  // extern "C"
