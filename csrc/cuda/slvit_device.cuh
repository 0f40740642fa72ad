// Device helpers shared by the forward (slvit_kernels.cu) and backward (slvit_backward.cu) kernels:
// element loads/stores with float32 compute, warp reductions, GELU, dot products, and the forward
// stages the backward recomputes (patch embedding, LayerNorm, Q/K/V, softmax attention), so the
// recompute is by construction the forward's arithmetic. Works under nvcc and under the SIMT
// emulator (SLVIT_EMULATE).
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

#include <type_traits>

#include "slvit_kernels.cuh"
#include "slvit_mma.cuh"

namespace slvit {

// Whether the GEMM stages run on tensor cores: always for fp16/bf16 (m16n8k16, fp32 accumulate);
// for float32 only when TF32 is allowed (a.tf32), otherwise exact SIMT FFMA.
template <class S>
__host__ __device__ __forceinline__ bool tensor_cores(const ExitArgs& a) {
  return !std::is_same<S, float>::value || a.tf32 != 0;
}

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

// Activation transforms applied to a row's elements as a dot product reads them (the backward keeps
// the MLP pre-activation and applies GELU on the fly where the forward stored GELU's output).
struct Identity {
  __device__ __forceinline__ float operator()(float v) const { return v; }
};
struct Gelu {
  __device__ __forceinline__ float operator()(float v) const { return gelu(v); }
};

// dot product of f(float32 activation row) and a weight row of type T
// (four interleaved partial sums: more ILP on the GPU and a smaller rounding error for long rows)
template <class S, class F = Identity>
__device__ __forceinline__ float dot_fw(const float* a, const S* w, int n, F f = F()) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
  int k = 0;
  for (; k + 4 <= n; k += 4) {
    a0 += f(a[k]) * ld(w + k);
    a1 += f(a[k + 1]) * ld(w + k + 1);
    a2 += f(a[k + 2]) * ld(w + k + 2);
    a3 += f(a[k + 3]) * ld(w + k + 3);
  }
  for (; k < n; ++k) a0 += f(a[k]) * ld(w + k);
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


// ---- block-wide stages (every thread of the block calls them; the caller puts __syncthreads between) --

// Token embedding of sample b into tok (T rows of d): patch tokens as an implicit GEMM straight from
// the strided feature map, tok[n, e] = bp[e] + pos[n, e] + sum_{i,j,c} x[b, c, gy*ph+i, gx*pw+j]
// Wp[e, (i*pw+j)*C + c], then the a.E extra tokens (extra @ We^T + be).
template <class S>
__device__ void embed_tokens(const ExitArgs& a, int b, float* tok) {
  const int tid = threadIdx.x, nthreads = blockDim.x, d = a.d;
  const S* x = static_cast<const S*>(a.x) + (int64_t)b * a.sx_b;
  const S* wp = static_cast<const S*>(a.wp);
  const S* bp = static_cast<const S*>(a.bp);
  const S* pos = static_cast<const S*>(a.pos);
  const int P = a.ph * a.pw * a.C;
  if (tensor_cores<S>(a)) {
    // patch matrix (Np x P) gathered from the strided map as the A operand: k = (i*pw + j)*C + c
    const int pwC = a.pw * a.C;
    auto patch = [&](int n, int k) {
      const int gy = n / a.gw, gx = n % a.gw, i = k / pwC, j = (k / a.C) % a.pw, c = k % a.C;
      return ld(x + (int64_t)c * a.sx_c + (int64_t)(gy * a.ph + i) * a.sx_h + (int64_t)(gx * a.pw + j) * a.sx_w);
    };
    block_gemm_tc<S>(a.Np, d, P, patch, wp, P, [&](int n, int e, float acc) {
      tok[n * d + e] = acc + (ld(bp + e) + ld(pos + n * d + e));
    });
  } else
  for (int idx = tid; idx < a.Np * d; idx += nthreads) {
    const int n = idx / d, e = idx % d;
    const int gy = n / a.gw, gx = n % a.gw;
    float acc = ld(bp + e) + ld(pos + idx);
    const S* wrow = wp + (int64_t)e * P;
    for (int i = 0; i < a.ph; ++i) {
      for (int j = 0; j < a.pw; ++j) {
        const S* xp = x + (int64_t)(gy * a.ph + i) * a.sx_h + (int64_t)(gx * a.pw + j) * a.sx_w;
        const S* wr = wrow + (i * a.pw + j) * a.C;
        // two-level summation (two interleaved partial sums per patch pixel, then over pixels):
        // shorter rounding chains than one running sum over all ph*pw*C terms
        float p0 = 0.f, p1 = 0.f;
        int c = 0;
        for (; c + 2 <= a.C; c += 2) {
          p0 += ld(xp + (int64_t)c * a.sx_c) * ld(wr + c);
          p1 += ld(xp + (int64_t)(c + 1) * a.sx_c) * ld(wr + c + 1);
        }
        if (c < a.C) p0 += ld(xp + (int64_t)c * a.sx_c) * ld(wr + c);
        acc += p0 + p1;
      }
    }
    tok[idx] = acc;
  }
  if (a.E > 0) {
    const S* ex = static_cast<const S*>(a.extra) + (int64_t)b * a.E * a.De;
    const S* we = static_cast<const S*>(a.we);
    const S* be = static_cast<const S*>(a.be);
    for (int idx = tid; idx < a.E * d; idx += nthreads) {
      const int k = idx / d, e = idx % d;
      float acc = ld(be + e);
      for (int c = 0; c < a.De; ++c) acc += ld(ex + k * a.De + c) * ld(we + (int64_t)e * a.De + c);
      tok[(a.Np + k) * d + e] = acc;
    }
  }
}

// Q, K, V projections of the LayerNorm output y (T rows of d): qkv[t, which*A + r] (which 0 Q, 1 K, 2 V).
template <class S>
__device__ void qkv_projection(const LayerPtrs& lp, const float* y, float* qkv, int T, int d, int A, bool tc) {
  const int A3 = 3 * A;
  if (tc) {
    auto yat = [&](int t, int k) { return y[t * d + k]; };
    for (int which = 0; which < 3; ++which) {
      const S* w = static_cast<const S*>(which == 0 ? lp.wq : which == 1 ? lp.wk : lp.wv);
      const S* bias = static_cast<const S*>(which == 0 ? lp.bq : which == 1 ? lp.bk : lp.bv);
      block_gemm_tc<S>(T, A, d, yat, w, d, [&](int t, int r, float acc) {
        qkv[(int64_t)t * A3 + which * A + r] = ld(bias + r) + acc;
      });
    }
    return;
  }
  for (int idx = threadIdx.x; idx < T * A3; idx += blockDim.x) {
    const int t = idx / A3, col = idx % A3, which = col / A, r = col % A;
    const S* w = static_cast<const S*>(which == 0 ? lp.wq : which == 1 ? lp.wk : lp.wv);
    const S* bias = static_cast<const S*>(which == 0 ? lp.bq : which == 1 ? lp.bk : lp.bv);
    qkv[idx] = ld(bias + r) + dot_fw(y + t * d, w + (int64_t)r * d, d);
  }
}

// Full-row softmax attention of one sample, a warp per (head, query row):
// o[i, h*kd + c] = sum_j softmax_j(scale q_i.k_j) v_j[c], with qkv laid out as qkv_projection writes it.
// Score rows live in `rows`: with keep_probs (the backward) row (h, i) is rows[(h*T + i)*T ...] and
// ends up holding the normalised probabilities; otherwise rows is a scratch row per warp
// (nwarps * T floats, e.g. dynamic shared memory). The 1/sum is applied once to each output element
// (one rounding fewer per term than normalising the row first).
__device__ inline void attention_rows(const float* qkv, float* o, float* rows, bool keep_probs, int T, int A,
                                      int heads, int kd, float scale) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int A3 = 3 * A;
  for (int row = warp; row < heads * T; row += nwarps) {
    const int h = row / T, i = row % T;
    const float* q = qkv + (int64_t)i * A3 + h * kd;
    float* srow = rows + (keep_probs ? (int64_t)row : (int64_t)warp) * T;
    float mx = -INFINITY;
    for (int j = lane; j < T; j += 32) {
      const float* k = qkv + (int64_t)j * A3 + A + h * kd;
      float s = 0.f;
      for (int c = 0; c < kd; ++c) s += q[c] * k[c];
      s *= scale;
      srow[j] = s;
      mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.f;
    for (int j = lane; j < T; j += 32) {
      const float e = expf(srow[j] - mx);
      srow[j] = e;
      sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    __syncwarp();  // the whole score row is written before any lane reads it
    for (int c = lane; c < kd; c += 32) {
      const float* v = qkv + 2 * A + h * kd + c;
      float acc = 0.f;
      for (int j = 0; j < T; ++j) acc += srow[j] * v[(int64_t)j * A3];
      o[(int64_t)i * A + h * kd + c] = acc * inv;
    }
    __syncwarp();  // reads done before the row is normalised or overwritten by the warp's next row
    if (keep_probs)
      for (int j = lane; j < T; j += 32) srow[j] *= inv;
  }
}


// The same attention on tensor cores, one head at a time over the whole block: scores = scale Q_h K_h^T
// (T x T, MMA) into `scores`, full-row softmax (a warp per row, normalised in place), o_h = P V_h (MMA,
// P rounded to S like the reference's half-precision softmax output). With keep_probs (the backward)
// head h's probabilities stay at scores + h*T*T; otherwise `scores` is one T x T scratch.
template <class S>
__device__ void attention_tc(const float* qkv, float* o, float* scores, bool keep_probs, int T, int A, int heads,
                             int kd, float scale) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int A3 = 3 * A;
  for (int h = 0; h < heads; ++h) {
    float* sh = scores + (keep_probs ? (int64_t)h * T * T : 0);
    block_gemm_tc_f<S>(
        T, T, kd, [&](int i, int c) { return qkv[(int64_t)i * A3 + h * kd + c]; },
        [&](int j, int c) { return qkv[(int64_t)j * A3 + A + h * kd + c]; },
        [&](int i, int j, float acc) { sh[(int64_t)i * T + j] = acc * scale; });
    __syncthreads();
    for (int i = warp; i < T; i += nwarps) {
      float* srow = sh + (int64_t)i * T;
      float mx = -INFINITY;
      for (int j = lane; j < T; j += 32) mx = fmaxf(mx, srow[j]);
      mx = warp_max(mx);
      float sum = 0.f;
      for (int j = lane; j < T; j += 32) {
        const float e = expf(srow[j] - mx);
        srow[j] = e;
        sum += e;
      }
      const float inv = 1.0f / warp_sum(sum);
      for (int j = lane; j < T; j += 32) srow[j] *= inv;
    }
    __syncthreads();
    block_gemm_tc_f<S>(
        T, kd, T, [&](int i, int j) { return sh[(int64_t)i * T + j]; },
        [&](int c, int j) { return qkv[(int64_t)j * A3 + 2 * A + h * kd + c]; },
        [&](int i, int c, float acc) { o[(int64_t)i * A + h * kd + c] = acc; });
    __syncthreads();  // the scratch is the next head's
  }
}

// Attention output projection + residual: out[t, e] = res[t, e] + (bo[e] + o[t, :] . Wo[e, :]);
// out may be res (in place: each element reads only its own residual).
template <class S>
__device__ void out_projection(const LayerPtrs& lp, const float* o, const float* res, float* out, int T, int d,
                               int A, bool tc) {
  const S* wo = static_cast<const S*>(lp.wo);
  const S* bo = static_cast<const S*>(lp.bo);
  if (tc) {
    block_gemm_tc<S>(T, d, A, [&](int t, int k) { return o[(int64_t)t * A + k]; }, wo, A,
                     [&](int t, int e, float acc) { out[t * d + e] = res[t * d + e] + (ld(bo + e) + acc); });
    return;
  }
  for (int idx = threadIdx.x; idx < T * d; idx += blockDim.x) {
    const int t = idx / d, e = idx % d;
    out[idx] = res[idx] + (ld(bo + e) + dot_fw(o + (int64_t)t * A, wo + (int64_t)e * A, A));
  }
}

// MLP fc1 of the LayerNorm output y: h[t, m] = f(b1m[m] + y[t, :] . W1[m, :]); f is Gelu in the
// forward, Identity in the backward (which keeps the pre-activation for GELU's derivative).
template <class S, class F>
__device__ void mlp_fc1(const LayerPtrs& lp, const float* y, float* h, int T, int d, int M, F f, bool tc) {
  const S* w1 = static_cast<const S*>(lp.w1);
  const S* b1 = static_cast<const S*>(lp.b1m);
  if (tc) {
    block_gemm_tc<S>(T, M, d, [&](int t, int k) { return y[t * d + k]; }, w1, d,
                     [&](int t, int m, float acc) { h[(int64_t)t * M + m] = f(ld(b1 + m) + acc); });
    return;
  }
  for (int idx = threadIdx.x; idx < T * M; idx += blockDim.x) {
    const int t = idx / M, m = idx % M;
    h[idx] = f(ld(b1 + m) + dot_fw(y + t * d, w1 + (int64_t)m * d, d));
  }
}

// MLP fc2 (+ residual): out[t, e] = (residual ? res[t, e] : 0) + b2m[e] + f(h[t, :]) . W2[e, :], where
// f(h) is the GELU output (f = Identity on stored GELU outputs, Gelu on pre-activations); out may be res.
template <class S, class F>
__device__ void mlp_fc2(const LayerPtrs& lp, const float* h, const float* res, float* out, int T, int d, int M,
                        int residual, F f, bool tc) {
  const S* w2 = static_cast<const S*>(lp.w2);
  const S* b2 = static_cast<const S*>(lp.b2m);
  if (tc) {
    block_gemm_tc<S>(T, d, M, [&](int t, int k) { return f(h[(int64_t)t * M + k]); }, w2, M,
                     [&](int t, int e, float acc) {
                       const float m = ld(b2 + e) + acc;
                       out[t * d + e] = residual ? res[t * d + e] + m : m;
                     });
    return;
  }
  for (int idx = threadIdx.x; idx < T * d; idx += blockDim.x) {
    const int t = idx / d, e = idx % d;
    const float m = ld(b2 + e) + dot_fw(h + (int64_t)t * M, w2 + (int64_t)e * M, M, f);
    out[idx] = residual ? res[idx] + m : m;
  }
}

// Head fc1 on the flattened final tokens of `rows` samples (row r at flat + r * lds, T*d floats):
// hidden[r * Hh + j] = act(bh1[j] + flat_r . Wh1[j, :]) (GELU or ReLU per a.act); with `pre`, the
// pre-activation is stored too (the backward needs it for the activation's derivative). On tensor
// cores the samples are the GEMM rows (the forward's head kernel runs 16 samples per block, so Wh1 is
// read once per 16 samples; the backward's recompute runs its one sample through the same MMA
// arithmetic); otherwise a warp per hidden unit and sample.
template <class S>
__device__ void head_hidden(const ExitArgs& a, const float* flat, int64_t lds, int rows, float* hidden, bool tc,
                            float* pre = nullptr) {
  const int K = a.T * a.d, Hh = a.Hh;
  const S* wh1 = static_cast<const S*>(a.wh1);
  const S* bh1 = static_cast<const S*>(a.bh1);
  if (tc) {
    block_gemm_tc<S>(rows, Hh, K, [&](int r, int k) { return flat[r * lds + k]; }, wh1, K, [&](int r, int j, float acc) {
      const float z = acc + ld(bh1 + j);
      hidden[r * Hh + j] = a.act == 0 ? gelu(z) : fmaxf(z, 0.f);
      if (pre) pre[r * Hh + j] = z;
    });
    return;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int rj = warp; rj < rows * Hh; rj += nwarps) {
    const int r = rj / Hh, j = rj % Hh;
    const S* w = wh1 + (int64_t)j * K;
    const float* f = flat + r * lds;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += f[k] * ld(w + k);
    acc = warp_sum(acc) + ld(bh1 + j);
    if (lane == 0) {
      hidden[rj] = a.act == 0 ? gelu(acc) : fmaxf(acc, 0.f);
      if (pre) pre[rj] = acc;
    }
  }
}

}  // namespace slvit
