// Fused AVX2/FMA inference forward of the SL-ViT exit (plain C++ API, no torch types); its GEMMs run
// on AVX-512 tiles (fused_avx512.cpp) when Problem::isa says so.
//
// Layout: every activation is stored feature-major ("transposed": features x token columns), so the
// weights are the left GEMM operand read straight from their PyTorch (out, in) row-major storage -
// no packed copy of the weights is ever made or cached (a cache keyed on tensor identity could go
// stale when weights change through .data) - and the token columns are the SIMD dimension.
// Patches are gathered into that layout directly from NCHW or channels_last memory; bias, position
// embedding, residual adds, GELU/ReLU and the attention scale are GEMM epilogues; LayerNorm and
// softmax run down the columns (no horizontal reductions). See csrc/README.md "CPU backend design".
#pragma once

#include <cstdint>

namespace slvit_fused {

// Instruction set of the GEMM tiles (Problem::isa); the rest of the forward is AVX2 either way.
enum Isa { kIsaAvx2 = 0, kIsaAvx512 = 1 };

struct LayerWeights {
  const float *g1, *b1, *Wq, *bq, *Wk, *bk, *Wv, *bv, *Wo, *bo, *g2, *b2, *W1, *c1, *W2, *c2;
};

struct Problem {
  // shapes (as the op's cfg, plus the input's)
  int64_t B, C, H, W, ph, pw, gh, gw, Np, E, De, T, d, heads, kd, A, mlp, hidden, outputs, layers;
  bool residual;   // encoder MLP residual
  bool legacy_phases = false;  // team path with the old phase layout (LN and flat copies as own phases)
  int head_act;    // 1 gelu, 2 relu
  int isa = kIsaAvx2;  // GEMM tiles: kIsaAvx512 only when avx512_missing() returned nullptr
  // patch embedding straight from the image rows (patch_embed_avx512.cpp) where it applies (AVX-512
  // tiles, unit pixel stride, pw in 2/4/8/16); false = always the gathered patch panels
  bool embed_direct = true;
  float eps;
  // input feature map, any strides (elements)
  const float* x;
  int64_t sb, sc, sh, sw;
  const float* extra;  // (B, E, De) contiguous, or nullptr
  // weights, PyTorch layouts, float32 contiguous
  const float *Wp, *bp, *pos, *We, *be;
  const LayerWeights* layer;  // [layers]
  const float *Wh1, *bh1, *Wh2, *bh2;
  // result, row-major (B, outputs)
  float* out;
};

// Spin barrier shared by the workers of one call (sense by generation counter).
struct Barrier {
  alignas(64) int count = 0;
  alignas(64) int gen = 0;
  int total = 1;
  alignas(64) int64_t next_chunk = 0;  // workers that own samples claim chunks from it (run())
};

// True when this CPU has AVX2 and FMA (checked at run time; the file is compiled for them).
bool cpu_supported();

// nullptr when the CPU and OS support the AVX-512 GEMM tiles (AVX-512F/DQ/BW/VL, opmask and ZMM
// state enabled in XCR0), else the name of the first missing feature ("avx512bw"). Call only after
// cpu_supported() said yes. SLVIT_FAST_CPU_TEST_HIDE_FEATURE=<name> (test knob) hides one feature.
const char* avx512_missing();

// Elementwise exact-erf GELU and its backward (dx = g * gelu'(x)) for the training path, n floats;
// the same rational erf as the fused forward (|error| < 1e-7). Serial (callers split the work).
void gelu_forward(const float* x, float* y, int64_t n);
void gelu_backward(const float* g, const float* x, float* dx, int64_t n);
// Both at once for the training backward's recompute: y = gelu(x) and dydx = gelu'(x) (one erf per
// element instead of one in gelu_forward and another in gelu_backward); y is gelu_forward's bits and
// g * dydx is gelu_backward's, on either `isa` (slvit_fused::Isa: AVX-512 runs the same ops 16 wide).
// dydx may be x itself (in place); y must not overlap x otherwise.
void gelu_forward_grad(int isa, const float* x, float* y, float* dydx, int64_t n);

// Forward of one (sample, head) of attention for the training path (same operand layout as the
// backward below): P = softmax(s Q K^T) row-wise into P (T x T, saved), O = (P*mask) V into o
// (kd columns, ld_o apart). `scratch`: attention_forward_floats(T, kd) floats.
int64_t attention_forward_floats(int64_t T, int64_t kd);
void attention_forward_head(const float* q, const float* k, const float* v, int64_t ld_qkv, float* P,
                            const float* mask, float* o, int64_t ld_o, int64_t T, int64_t kd, float scale,
                            float* scratch);

// Backward of one (sample, head) of attention for the training path, token-major operands:
// q/k/v rows are tokens (ld_qkv apart, the head's kd columns at the given pointers), P the saved
// softmax (T x T, rows = queries), dO the output gradient (ld_do). `mask` (T x T, 0 or 1/(1-rate)) is
// the attention dropout, or nullptr. Writes dQ, dK, dV (kd columns each, ld_d apart):
//   dV = (P*mask)^T dO;  dS = P * (dP - rowsum(P * dP)), dP = (dO V^T) * mask;  dQ = s dS K;  dK = s dS^T Q.
// `scratch`: attention_backward_floats(T, kd) floats.
int64_t attention_backward_floats(int64_t T, int64_t kd);
void attention_backward_head(const float* q, const float* k, const float* v, int64_t ld_qkv, const float* P,
                             const float* mask, const float* dO, int64_t ld_do, float* dq, float* dk, float* dv,
                             int64_t ld_d, int64_t T, int64_t kd, float scale, float* scratch);

// Floats of workspace run() needs for `nw` workers.
int64_t workspace_floats(const Problem& p, int nw);

// Per-phase time stamp counter cycles of worker 0 (the calling thread) of the following calls, for
// profiling: set_profiling(true) zeroes the counters and turns them on (they cost two rdtsc per phase).
enum Phase { kPhGather, kPhEmbed, kPhLayerNorm, kPhQKV, kPhAttention, kPhOutProj, kPhFc1, kPhFc2, kPhFlat,
             kPhHead, kPhBarrier, kPhOther, kNumPhases };
void set_profiling(bool on);
void read_profile(double* cycles);  // kNumPhases values

// Runs workers [wlo, whi) of `nw` on the calling thread. Every worker range of one call must run
// concurrently (one OpenMP team), because workers meet at `bar` between dependent phases.
void run(const Problem& p, float* workspace, int nw, int wlo, int whi, Barrier* bar);

}  // namespace slvit_fused
