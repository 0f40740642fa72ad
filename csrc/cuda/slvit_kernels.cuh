// Declarations of the SL-ViT exit CUDA kernels' launch functions (no torch headers: raw pointers,
// explicit strides, a stream argument). Implemented in slvit_kernels.cu, which is compiled twice:
// by nvcc (slvit_fast._C_cuda) and as host C++ under csrc/emu/simt_emu.h (slvit_fast._C_emu).
#pragma once

#include <cstddef>
#include <cstdint>

namespace slvit {

constexpr int kMaxLayers = 4;
constexpr int kThreads = 256;  // threads per block of both kernels

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct LayerPtrs {
  const void *g1, *b1, *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo, *g2, *b2, *w1, *b1m, *w2, *b2m;
};

// Everything one exit forward needs. Pointers are of the element type `dtype` (weights contiguous,
// torch Linear layout (out, in)); x is (B, C, H, W) with arbitrary element strides (NCHW or
// channels_last); extra is contiguous (B, E, De). `ws` is a float32 workspace of
// B * workspace_floats_per_sample() elements; `out` is (B, O) contiguous of `dtype`.
struct ExitArgs {
  DType dtype;
  const void* x;
  int64_t sx_b, sx_c, sx_h, sx_w;
  const void* extra;
  const void *wp, *bp, *pos, *we, *be;
  LayerPtrs layers[kMaxLayers];
  const void *wh1, *bh1, *wh2, *bh2;
  int B, C, H, W, ph, pw, gh, gw, Np, E, De, T, d, heads, kd, A, M, Hh, O, L;
  int residual, act;  // act: 0 exact GELU, 1 ReLU
  int tf32;           // float32 only: GEMM stages on TF32 tensor cores (torch float32 matmul precision != highest)
  float eps, scale;
  float* ws;
  int64_t ws_stride;
  void* out;
};

// tokens, LN output, Q/K/V, attention output, MLP hidden (T rows each) and one head's T x T scores
// (the tensor-core attention's scratch).
inline int64_t workspace_floats_per_sample(int T, int d, int A, int M) {
  return (int64_t)T * (2 * d + 4 * A + M) + (int64_t)T * T;
}

// Checks the sizes the kernels support; returns nullptr if fine, else a message.
const char* check_exit_args(const ExitArgs& a);

// The whole exit forward in two launches: encoder (patch embed + L encoder layers) and head.
// Returns nullptr on success, else an error message (launch failure).
const char* launch_exit_forward(const ExitArgs& a, void* stream);

// Self-test kernels for the emulator (torch ops in csrc/emu/emu_ops.cpp): a block-wide reversal through
// shared memory, with or without its __syncthreads, and a warp-shuffle sum.
const char* launch_selftest_reverse(const float* in, float* out, int n, int threads, bool with_sync, void* stream);
const char* launch_selftest_warpsum(const float* in, float* out, int n, void* stream);

// ---- backward ----------------------------------------------------------------------------------------
constexpr int kMaxParams = 3 + 2 + 16 * kMaxLayers + 4;

// Gradients of the exit w.r.t. x, extra and every parameter. `blocks` blocks (1..B), block k handles
// samples k, k + blocks, ... (recomputing each sample's forward activations into its workspace, then
// back-propagating) and accumulates parameter gradients in its own float32 slot
// partials[k * ptotal + goff[i] ...] (zero-initialised by the caller; no atomics); a second kernel sums
// the slots once into grads (ptotal floats, fully written), the i-th parameter at grads + goff[i].
// num_layers 1..kMaxLayers.
struct BackwardArgs {
  ExitArgs f;        // forward arguments; f.ws / f.ws_stride describe the *backward* workspace (one per block)
  const void* gout;  // (B, O) contiguous, dtype f.dtype
  float* grads;
  float* partials;  // blocks * ptotal floats, zeroed
  int64_t ptotal;
  int blocks;
  int64_t goff[kMaxParams];
  void* dx;  // same dtype as x, strides sdx_*; written only when need_dx
  int64_t sdx_b, sdx_c, sdx_h, sdx_w;
  int need_dx;
  void* dextra;  // (B, E, De) contiguous, dtype f.dtype (when E > 0)
};

// Partial-gradient memory the caller may spend (floats): blocks = min(B, max(1, budget / ptotal)).
constexpr int64_t kPartialBudgetFloats = (int64_t)1 << 26;  // 256 MB

// (L + 1) token checkpoints, one layer's internals (y1, st1, qkv, P, o, t1, y2, st2, hpre), head (z, za,
// dz) and the gradient scratch (dt, dy, dh, dO, dS, dqkv), see slvit_backward.cu.
inline int64_t backward_workspace_floats_per_sample(int T, int d, int A, int M, int heads, int Hh, int L) {
  return (int64_t)T * ((L + 1) * d + 3 * d + 4 + 3 * A + A + M) + (int64_t)heads * T * T + 3 * (int64_t)Hh +
         (int64_t)T * (2 * d + 3 * A + A + M) + (int64_t)heads * T * T;
}
const char* launch_exit_backward(const BackwardArgs& a, void* stream);
constexpr int kBackwardLaunches = 2;  // backward kernel + gradient reduction

// Number of kernel launches made by launch_exit_forward (for slvit_fast.profiling).
constexpr int kForwardLaunches = 2;

}  // namespace slvit
