// SL-ViT exit forward as two CUDA kernels (no torch headers; see slvit_kernels.cuh).
//
//   slvit_encoder_kernel  one block per sample: implicit-GEMM patch embedding straight from the
//                         strided feature map (+ position, + extra tokens), then for each encoder
//                         layer LN -> Q/K/V (h heads x key_dim) -> full-row softmax attention (SIMT: a
//                         warp per (head, query row), scores in shared memory, warp-shuffle max/sum;
//                         tensor cores: per head QK^T and PV as block GEMMs, scores in the workspace) ->
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

constexpr int kHeadRows = 16;  // samples per head block on tensor cores (the MMA's M)

// Samples per head block: kHeadRows on tensor cores when their hidden rows fit in 48 KB of shared
// memory (head_hidden <= 768), else one (SIMT).
template <class S>
__host__ __device__ __forceinline__ int head_rows(const ExitArgs& a) {
  return tensor_cores<S>(a) && sizeof(float) * kHeadRows * a.Hh <= 48 * 1024 ? kHeadRows : 1;
}

template <class S>
__global__ void __launch_bounds__(kThreads) slvit_encoder_kernel(ExitArgs a) {
  SLVIT_DYNAMIC_SMEM(float, scores);  // nwarps * T floats: one score row per warp
  const int b = blockIdx.x;
  const int T = a.T, d = a.d, A = a.A, M = a.M;
  float* tok = a.ws + (int64_t)b * a.ws_stride;
  float* y = tok + T * d;
  float* qkv = y + T * d;
  float* o = qkv + (int64_t)T * 3 * A;
  float* hb = o + (int64_t)T * A;
  const bool tc = tensor_cores<S>(a);  // GEMM stages on tensor cores (bf16/fp16; fp32 when TF32 is allowed)

  // 1. patch embedding (+ position, + extra tokens)
  embed_tokens<S>(a, b, tok);
  __syncthreads();

  for (int l = 0; l < a.L; ++l) {
    const LayerPtrs& lp = a.layers[l];
    // 2. LN1
    layer_norm_rows(tok, y, static_cast<const S*>(lp.g1), static_cast<const S*>(lp.b1), T, d, a.eps);
    __syncthreads();
    // 3. Q, K, V projections: qkv[t, which*A + r]
    qkv_projection<S>(lp, y, qkv, T, d, A, tc);
    __syncthreads();
    // 4. attention: a warp per (head, query row), full-row softmax, score rows in shared memory
    if (tc)
      attention_tc<S>(qkv, o, hb + (int64_t)T * M, false, T, A, a.heads, a.kd, a.scale);
    else
      attention_rows(qkv, o, scores, false, T, A, a.heads, a.kd, a.scale);
    __syncthreads();
    // 5. output projection + residual (in place)
    out_projection<S>(lp, o, tok, tok, T, d, A, tc);
    __syncthreads();
    // 6. LN2
    layer_norm_rows(tok, y, static_cast<const S*>(lp.g2), static_cast<const S*>(lp.b2), T, d, a.eps);
    __syncthreads();
    // 7. fc1 + GELU
    mlp_fc1<S>(lp, y, hb, T, d, M, Gelu(), tc);
    __syncthreads();
    // 8. fc2 (+ residual, in place)
    mlp_fc2<S>(lp, hb, tok, tok, T, d, M, a.residual, Identity(), tc);
    __syncthreads();
  }
}

// Head: hidden = act(flat Wh1^T + bh1), logits = hidden Wh2^T + bh2, for kHeadRows samples per block
// on tensor cores (samples are the GEMM rows: Wh1, the largest weight, is read once per kHeadRows
// samples), one sample per block otherwise.
template <class S>
__global__ void __launch_bounds__(kThreads) slvit_head_kernel(ExitArgs a) {
  SLVIT_DYNAMIC_SMEM(float, hidden);  // rows x Hh floats
  const int per_block = head_rows<S>(a);
  const bool tc = per_block > 1;
  const int b0 = blockIdx.x * per_block, rows = per_block < a.B - b0 ? per_block : a.B - b0;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  // final tokens, (T*d) token-major per sample
  head_hidden<S>(a, a.ws + (int64_t)b0 * a.ws_stride, a.ws_stride, rows, hidden, tc);
  __syncthreads();
  const S* wh2 = static_cast<const S*>(a.wh2);
  const S* bh2 = static_cast<const S*>(a.bh2);
  S* out = static_cast<S*>(a.out) + (int64_t)b0 * a.O;
  if (tc) {
    block_gemm_tc<S>(rows, a.O, a.Hh, [&](int r, int k) { return hidden[r * a.Hh + k]; }, wh2, a.Hh,
                     [&](int r, int oi, float acc) { st(out + (int64_t)r * a.O + oi, acc + ld(bh2 + oi)); });
    return;
  }
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
static size_t head_smem(const ExitArgs& a, int rows) { return sizeof(float) * rows * a.Hh; }

const char* check_exit_args(const ExitArgs& a) {
  if (a.L < 1 || a.L > kMaxLayers) return "num_layers must be between 1 and 4 for the CUDA kernels";
  if (a.B < 1 || a.B > 2147483647) return "batch size out of range";
  if (encoder_smem(a) > 48 * 1024) return "too many tokens for the CUDA encoder kernel (T > 1536)";
  if (head_smem(a, 1) > 48 * 1024) return "head_hidden too large for the CUDA head kernel (> 12288)";
  if ((int64_t)a.T * 3 * a.A >= (int64_t)1 << 31 || (int64_t)a.T * a.M >= (int64_t)1 << 31)
    return "activation sizes exceed 32-bit indexing";
  return nullptr;
}


template <class S>
static const char* launch_typed(const ExitArgs& a, slvit_stream_t stream) {
  SLVIT_LAUNCH(slvit_encoder_kernel<S>, dim3(a.B), dim3(kThreads), encoder_smem(a), stream, a);
  if (const char* err = SLVIT_CHECK_LAUNCH()) return err;
  const int rows = head_rows<S>(a);
  SLVIT_LAUNCH(slvit_head_kernel<S>, dim3((a.B + rows - 1) / rows), dim3(kThreads), head_smem(a, rows), stream, a);
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
