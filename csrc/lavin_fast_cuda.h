/* C ABI of liblavin_fast_cuda.so: launchers taking device pointers, sizes, strides (in elements)
 * and a CUDA stream. No torch headers: the library builds with nvcc alone and is loaded with ctypes.
 *
 * Every launcher returns 0 on success, a negative LAVIN_ERR_* code for a bad argument (nothing is
 * launched), or a positive cudaError_t from the launch. lavin_fast_cuda_error_string() names them.
 * Tensors: x, residual, h, dy, dout are [B, L, D] with rows contiguous (stride 1 along D) and row
 * strides (stride_*b, stride_*l); scale and gate are [B, D] with row stride stride_*b; outputs
 * (y, out, dx, dh) are written contiguous [B, L, D]. partial is float32 [B, G, D] with
 * G = ceil(L / rows_per_group); the caller sums it over G (dscale = sum; dgate = sum * (1 - tanh^2)).
 */
#ifndef LAVIN_FAST_CUDA_H
#define LAVIN_FAST_CUDA_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LAVIN_FAST_CUDA_ABI 1

#if defined(__GNUC__)
#define LAVIN_API __attribute__((visibility("default")))
#else
#define LAVIN_API
#endif

enum lavin_dtype { LAVIN_F32 = 0, LAVIN_F16 = 1, LAVIN_BF16 = 2 };

enum lavin_error {
  LAVIN_OK = 0,
  LAVIN_ERR_DTYPE = -1,     /* unknown dtype code */
  LAVIN_ERR_SIZE = -2,      /* a size is negative or zero where it must be positive */
  LAVIN_ERR_TOO_WIDE = -3,  /* D exceeds lavin_sandwich_norm_max_d() for this dtype / alignment */
};

typedef struct CUstream_st* lavin_stream_t; /* == cudaStream_t */

LAVIN_API int lavin_fast_cuda_abi_version(void);
LAVIN_API const char* lavin_fast_cuda_error_string(int code);

/* Widest row the kernels take: vectorized (16-byte aligned pointers and row strides, D a multiple
 * of 16 / sizeof(element)) or not. */
LAVIN_API int64_t lavin_sandwich_norm_max_d(int dtype, int vectorized);

/* Launch shape of a kernel for rows of D elements moved `vec` at a time (1, or 16 / element size):
 * threads per row (blockDim.x) and rows (or backward row groups) per block (blockDim.y).
 * Returns LAVIN_OK or LAVIN_ERR_TOO_WIDE / LAVIN_ERR_SIZE. Exposed so that other launchers (the CuPy
 * path in lavin_fast/ops/_cuda.py) can be checked against this one. */
LAVIN_API int lavin_sandwich_norm_config(int64_t D, int vec, int backward, int* threads_per_row, int* rows_per_block);

LAVIN_API int lavin_rms_norm_modulate_fwd(int dtype, const void* x, const void* scale, void* y, int64_t B, int64_t L, int64_t D,
                                int64_t stride_xb, int64_t stride_xl, int64_t stride_sb, float eps,
                                lavin_stream_t stream);

LAVIN_API int lavin_rms_norm_modulate_bwd(int dtype, const void* x, const void* scale, const void* dy, void* dx, float* partial,
                                int64_t B, int64_t L, int64_t D, int64_t stride_xb, int64_t stride_xl,
                                int64_t stride_sb, int64_t stride_dyb, int64_t stride_dyl, float eps,
                                int64_t rows_per_group, lavin_stream_t stream);

LAVIN_API int lavin_gated_rms_norm_residual_fwd(int dtype, const void* residual, const void* h, const void* gate, void* out,
                                      int64_t B, int64_t L, int64_t D, int64_t stride_rb, int64_t stride_rl,
                                      int64_t stride_hb, int64_t stride_hl, int64_t stride_gb, float eps,
                                      lavin_stream_t stream);

LAVIN_API int lavin_gated_rms_norm_residual_bwd(int dtype, const void* h, const void* gate, const void* dout, void* dh,
                                      float* partial, int64_t B, int64_t L, int64_t D, int64_t stride_hb,
                                      int64_t stride_hl, int64_t stride_gb, int64_t stride_db, int64_t stride_dl,
                                      float eps, int64_t rows_per_group, lavin_stream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* LAVIN_FAST_CUDA_H */
