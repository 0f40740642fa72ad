// SL-ViT exit forward as two CUDA kernels (no torch headers; see slvit_kernels.cuh).
//
//   slvit_encoder_kernel  one block per sample: implicit-GEMM patch embedding straight from the
//                         strided feature map (+ position, + extra tokens), then for each encoder
//                         layer LN -> Q/K/V (h heads x key_dim) -> full-row softmax attention (a warp
//                         per (head, query row), scores in shared memory, warp-shuffle max/sum) ->
//                         output projection + residual -> LN -> fc1 + exact GELU -> fc2 (+ residual).
//                         Stages are separated by __syncthreads; per-sample activations live in a
//                         float32 workspace (L2-resident at these sizes: T <= 160, d <= 64).
//   slvit_head_kernel     one block per sample: flatten -> fc1 (a warp per hidden unit, shuffle
//                         reduction) -> GELU/ReLU -> fc2 -> logits in the input dtype.
//
// All arithmetic accumulates in float32; fp16 / bf16 are converted on load and store.
// Compiled by nvcc, or as host C++ under csrc/emu/simt_emu.h when SLVIT_EMULATE is defined.

#include "slvit_device.cuh"

namespace slvit {

template <class S>
__global__ void __launch_bounds__(kThreads) slvit_encoder_kernel(ExitArgs a) {
  SLVIT_DYNAMIC_SMEM(float, scores);  // nwarps * T floats: one score row per warp
  const int b = blockIdx.x;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid % 32, warp = tid / 32, nwarps = nthreads / 32;
  const int T = a.T, d = a.d, A = a.A, A3 = 3 * a.A, M = a.M;
  float* tok = a.ws + (int64_t)b * a.ws_stride;
  float* y = tok + T * d;
  float* qkv = y + T * d;
  float* o = qkv + (int64_t)T * A3;
  float* hb = o + (int64_t)T * A;

  // 1. patch embedding: tok[n, e] = bp[e] + pos[n, e] + sum_{i,j,c} x[b, c, gy*ph+i, gx*pw+j] W[e, (i*pw+j)*C + c]
  {
    const S* x = static_cast<const S*>(a.x) + (int64_t)b * a.sx_b;
    const S* wp = static_cast<const S*>(a.wp);
    const S* bp = static_cast<const S*>(a.bp);
    const S* pos = static_cast<const S*>(a.pos);
    const int P = a.ph * a.pw * a.C;
    for (int idx = tid; idx < a.Np * d; idx += nthreads) {
      const int n = idx / d, e = idx % d;
      const int gy = n / a.gw, gx = n % a.gw;
      float acc = ld(bp + e) + ld(pos + idx);
      const S* wrow = wp + (int64_t)e * P;
      for (int i = 0; i < a.ph; ++i) {
        for (int j = 0; j < a.pw; ++j) {
          const S* xp = x + (int64_t)(gy * a.ph + i) * a.sx_h + (int64_t)(gx * a.pw + j) * a.sx_w;
          const S* wr = wrow + (i * a.pw + j) * a.C;
          float p0 = 0.f, p1 = 0.f;  // two-level summation: per patch pixel, then over pixels
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
  __syncthreads();

  for (int l = 0; l < a.L; ++l) {
    const LayerPtrs& lp = a.layers[l];
    // 2. LN1
    layer_norm_rows(tok, y, static_cast<const S*>(lp.g1), static_cast<const S*>(lp.b1), T, d, a.eps);
    __syncthreads();
    // 3. Q, K, V projections: qkv[t, which*A + r]
    for (int idx = tid; idx < T * A3; idx += nthreads) {
      const int t = idx / A3, col = idx % A3, which = col / A, r = col % A;
      const S* w = static_cast<const S*>(which == 0 ? lp.wq : which == 1 ? lp.wk : lp.wv);
      const S* bias = static_cast<const S*>(which == 0 ? lp.bq : which == 1 ? lp.bk : lp.bv);
      qkv[idx] = ld(bias + r) + dot_fw(y + t * d, w + (int64_t)r * d, d);
    }
    __syncthreads();
    // 4. attention: a warp per (head, query row), full-row softmax
    for (int row = warp; row < a.heads * T; row += nwarps) {
      const int h = row / T, i = row % T;
      const float* q = qkv + (int64_t)i * A3 + h * a.kd;
      float* srow = scores + warp * T;
      float mx = -INFINITY;
      for (int j = lane; j < T; j += 32) {
        const float* k = qkv + (int64_t)j * A3 + A + h * a.kd;
        float s = 0.f;
        for (int c = 0; c < a.kd; ++c) s += q[c] * k[c];
        s *= a.scale;
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
      for (int c = lane; c < a.kd; c += 32) {
        const float* v = qkv + 2 * A + h * a.kd + c;
        float acc = 0.f;
        for (int j = 0; j < T; ++j) acc += srow[j] * v[(int64_t)j * A3];
        o[(int64_t)i * A + h * a.kd + c] = acc * inv;
      }
      __syncwarp();  // reads done before the next row overwrites srow
    }
    __syncthreads();
    // 5. output projection + residual
    {
      const S* wo = static_cast<const S*>(lp.wo);
      const S* bo = static_cast<const S*>(lp.bo);
      for (int idx = tid; idx < T * d; idx += nthreads) {
        const int t = idx / d, e = idx % d;
        tok[idx] += ld(bo + e) + dot_fw(o + (int64_t)t * A, wo + (int64_t)e * A, A);
      }
    }
    __syncthreads();
    // 6. LN2
    layer_norm_rows(tok, y, static_cast<const S*>(lp.g2), static_cast<const S*>(lp.b2), T, d, a.eps);
    __syncthreads();
    // 7. fc1 + GELU
    {
      const S* w1 = static_cast<const S*>(lp.w1);
      const S* b1 = static_cast<const S*>(lp.b1m);
      for (int idx = tid; idx < T * M; idx += nthreads) {
        const int t = idx / M, m = idx % M;
        hb[idx] = gelu(ld(b1 + m) + dot_fw(y + t * d, w1 + (int64_t)m * d, d));
      }
    }
    __syncthreads();
    // 8. fc2 (+ residual)
    {
      const S* w2 = static_cast<const S*>(lp.w2);
      const S* b2 = static_cast<const S*>(lp.b2m);
      for (int idx = tid; idx < T * d; idx += nthreads) {
        const int t = idx / d, e = idx % d;
        const float m = ld(b2 + e) + dot_fw(hb + (int64_t)t * M, w2 + (int64_t)e * M, M);
        tok[idx] = a.residual ? tok[idx] + m : m;
      }
    }
    __syncthreads();
  }
}

template <class S>
__global__ void __launch_bounds__(kThreads) slvit_head_kernel(ExitArgs a) {
  SLVIT_DYNAMIC_SMEM(float, hidden);  // Hh floats
  const int b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const float* flat = a.ws + (int64_t)b * a.ws_stride;  // final tokens, (T*d) token-major
  const int K = a.T * a.d;
  const S* wh1 = static_cast<const S*>(a.wh1);
  const S* bh1 = static_cast<const S*>(a.bh1);
  const S* wh2 = static_cast<const S*>(a.wh2);
  const S* bh2 = static_cast<const S*>(a.bh2);
  for (int j = warp; j < a.Hh; j += nwarps) {
    const S* w = wh1 + (int64_t)j * K;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += flat[k] * ld(w + k);
    acc = warp_sum(acc) + ld(bh1 + j);
    if (lane == 0) hidden[j] = a.act == 0 ? gelu(acc) : fmaxf(acc, 0.f);
  }
  __syncthreads();
  S* out = static_cast<S*>(a.out) + (int64_t)b * a.O;
  for (int oi = warp; oi < a.O; oi += nwarps) {
    const S* w = wh2 + (int64_t)oi * a.Hh;
    float acc = 0.f;
    for (int k = lane; k < a.Hh; k += 32) acc += hidden[k] * ld(w + k);
    acc = warp_sum(acc) + ld(bh2 + oi);
    if (lane == 0) st(out + oi, acc);
  }
}

// ---- launch functions ----------------------------------------------------------------------------
static size_t encoder_smem(const ExitArgs& a) { return sizeof(float) * (kThreads / 32) * a.T; }
static size_t head_smem(const ExitArgs& a) { return sizeof(float) * a.Hh; }

const char* check_exit_args(const ExitArgs& a) {
  if (a.L < 1 || a.L > kMaxLayers) return "num_layers must be between 1 and 4 for the CUDA kernels";
  if (a.B < 1 || a.B > 2147483647) return "batch size out of range";
  if (encoder_smem(a) > 48 * 1024) return "too many tokens for the CUDA encoder kernel (T > 1536)";
  if (head_smem(a) > 48 * 1024) return "head_hidden too large for the CUDA head kernel (> 12288)";
  if ((int64_t)a.T * 3 * a.A >= (int64_t)1 << 31 || (int64_t)a.T * a.M >= (int64_t)1 << 31)
    return "activation sizes exceed 32-bit indexing";
  return nullptr;
}


template <class S>
static const char* launch_typed(const ExitArgs& a, slvit_stream_t stream) {
  SLVIT_LAUNCH(slvit_encoder_kernel<S>, dim3(a.B), dim3(kThreads), encoder_smem(a), stream, a);
  if (const char* err = SLVIT_CHECK_LAUNCH()) return err;
  SLVIT_LAUNCH(slvit_head_kernel<S>, dim3(a.B), dim3(kThreads), head_smem(a), stream, a);
  return SLVIT_CHECK_LAUNCH();
}

const char* launch_exit_forward(const ExitArgs& a, void* stream) {
  if (const char* err = check_exit_args(a)) return err;
  slvit_stream_t s = reinterpret_cast<slvit_stream_t>(stream);
  switch (a.dtype) {
    case DType::F32: return launch_typed<float>(a, s);
    case DType::F16: return launch_typed<__half>(a, s);
    case DType::BF16: return launch_typed<__nv_bfloat16>(a, s);
  }
  return "unsupported dtype";
}

// ---- emulator self-test kernels ------------------------------------------------------------------
// out[i] = in[n-1-i] through shared memory; correct only with the __syncthreads between the write
// and the read (compiled without it when with_sync is false, to prove the emulator catches that).
template <bool kSync>
__global__ void selftest_reverse_kernel(const float* in, float* out, int n) {
  SLVIT_DYNAMIC_SMEM(float, buf);
  const int i = threadIdx.x;
  if (i < n) buf[i] = in[i];
  if (kSync) __syncthreads();
  if (i < n) out[i] = buf[n - 1 - i];
}

__global__ void selftest_warpsum_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.f;
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0 && i < n) out[i / 32] = v;
}

const char* launch_selftest_reverse(const float* in, float* out, int n, int threads, bool with_sync, void* stream) {
  slvit_stream_t s = reinterpret_cast<slvit_stream_t>(stream);
  if (with_sync)
    SLVIT_LAUNCH(selftest_reverse_kernel<true>, dim3(1), dim3(threads), sizeof(float) * threads, s, in, out, n);
  else
    SLVIT_LAUNCH(selftest_reverse_kernel<false>, dim3(1), dim3(threads), sizeof(float) * threads, s, in, out, n);
  return SLVIT_CHECK_LAUNCH();
}

const char* launch_selftest_warpsum(const float* in, float* out, int n, void* stream) {
  slvit_stream_t s = reinterpret_cast<slvit_stream_t>(stream);
  SLVIT_LAUNCH(selftest_warpsum_kernel, dim3((n + 127) / 128), dim3(128), 0, s, in, out, n);
  return SLVIT_CHECK_LAUNCH();
}

}  // namespace slvit

namespace slvit {
// The -gencode architectures this translation unit was compiled for (nvcc sets __CUDA_ARCH_LIST__).
const char* compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define SLVIT_STR2(...) #__VA_ARGS__
#define SLVIT_STR(...) SLVIT_STR2(__VA_ARGS__)
  return SLVIT_STR(__CUDA_ARCH_LIST__);
#else
  return "emulated";
#endif
}
}  // namespace slvit
