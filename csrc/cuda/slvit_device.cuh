// Device helpers shared by the forward (slvit_kernels.cu) and backward (slvit_backward.cu) kernels:
// element loads/stores with float32 compute, warp reductions, GELU, dot products. Works under nvcc
// and under the SIMT emulator (SLVIT_EMULATE).
#pragma once

#ifdef SLVIT_EMULATE
#include "simt_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
typedef cudaStream_t slvit_stream_t;
#define SLVIT_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) unsigned char slvit_smem_raw[]; \
  type* name = reinterpret_cast<type*>(slvit_smem_raw)
#define SLVIT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <cmath>

#ifdef SLVIT_EMULATE
#define SLVIT_CHECK_LAUNCH() ((const char*)nullptr)
#else
#define SLVIT_CHECK_LAUNCH() ([]() -> const char* { \
    cudaError_t e = cudaGetLastError();              \
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e); }())
#endif

#include "slvit_kernels.cuh"

namespace slvit {

// ---- element access ----------------------------------------------------------------------------
__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

// dot product of a float32 activation row and a weight row of type T
// (four interleaved partial sums: more ILP on the GPU and a smaller rounding error for long rows)
template <class S>
__device__ __forceinline__ float dot_fw(const float* a, const S* w, int n) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    a0 += a[k] * ld(w + k);
    a1 += a[k + 1] * ld(w + k + 1);
    a2 += a[k + 2] * ld(w + k + 2);
    a3 += a[k + 3] * ld(w + k + 3);
  }
  for (; k < n; ++k) a0 += a[k] * ld(w + k);
  return (a0 + a1) + (a2 + a3);
}

// LayerNorm of `rows` rows of width d (a warp per row): out = (in - mean) * rstd * g + b; with
// `stats`, (mean, rstd) of row r are also stored at stats[2r], stats[2r + 1] (the backward's recompute).
template <class S>
__device__ void layer_norm_rows(const float* in, float* out, const S* g, const S* b, int rows, int d, float eps,
                                float* stats = nullptr) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int r = warp; r < rows; r += nwarps) {
    const float* x = in + (int64_t)r * d;
    float s = 0.f;
    for (int k = lane; k < d; k += 32) s += x[k];
    const float mean = warp_sum(s) / d;
    float v = 0.f;
    for (int k = lane; k < d; k += 32) {
      const float c = x[k] - mean;
      v += c * c;
    }
    const float rstd = rsqrtf(warp_sum(v) / d + eps);
    for (int k = lane; k < d; k += 32) out[(int64_t)r * d + k] = (x[k] - mean) * rstd * ld(g + k) + ld(b + k);
    if (stats && lane == 0) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

}  // namespace slvit
