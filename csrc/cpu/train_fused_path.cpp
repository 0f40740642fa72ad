// The fused CPU training path (SLVIT_FAST_CPU_TRAIN_FUSED, on by default on AVX2+FMA CPUs): the training
// forward and backward of the ops in slvit_cpu.cpp (exit_forward with save=true / exit_backward), token-
// major on the inference kernels' GEMM tiles (fused_tiles.h), attention per chunk (fused_train.cpp);
// plus the saved activations' allocation both training paths use (empty_slack, the saved pool,
// zero_mapped and the recompute mark). What it shares with slvit_cpu.cpp: train_common.h.
//
// Compiled for the baseline target like slvit_cpu.cpp (no AVX pragma here: it calls the AVX2/AVX-512
// kernels only through their plain-C++ entry points, after the run-time CPU check of the caller).

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>

#include "block_pool.h"
#include "train_common.h"

#ifdef SLVIT_FUSED_AVX2
#include "fused_avx2.h"
#include "fused_tiles.h"
#include "fused_train.h"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <sys/mman.h>
#include <vector>

namespace slvit_cpu {

// A float32 tensor of `shape` (contiguous) followed by kSlack readable floats: the AVX2 GEMM tiles of
// the fused training path read B operands up to the next 16-column boundary, so a saved activation
// they read as B may be over-read past its last row (results discarded). kSlack: train_common.h.
Tensor empty_slack(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto v : shape) n *= v;
  return at::empty({n + kSlack}, at::TensorOptions().dtype(at::kFloat)).narrow(0, 0, n).view(shape);
}
// empty_slack with its block from the training path's cache of freed blocks (block_pool.h: a step's
// ~80 MB of fresh saved tensors would otherwise be faulted in page by page every step), or a plain
// allocation when the cache is off.
Tensor pooled_slack(at::IntArrayRef shape) {
  if (block_pool_cap_bytes() == 0) return empty_slack(shape);
  int64_t n = 1;
  for (auto v : shape) n *= v;
  const size_t bytes = ((size_t)(n + kSlack) * sizeof(float) + 4095) / 4096 * 4096;
  void* p = block_pool_take(bytes);
  Tensor t = at::from_blob(p, {n + kSlack}, [bytes](void* q) { block_pool_give(q, bytes); },
                           at::TensorOptions().dtype(at::kFloat));
  return t.narrow(0, 0, n).view(shape);
}

static bool has_slack(const Tensor& t) {
  return t.is_contiguous() && t.scalar_type() == at::kFloat &&
         t.storage().nbytes() >= (size_t)(t.storage_offset() + t.numel() + kSlack) * sizeof(float);
}

// The fused forward does not compute into the saved patch matrix, Q/K/V and MLP hidden activations
// (saved[0] and each layer's qkv, hpre, hact; shapes kept for the ops' fake implementation): both
// backwards gather the patches again from x and recompute qkv = Wqkv y1 + b from the saved y1,
// hpre = W1 y2 + c1 and hact = dropout(GELU(hpre)) from the saved y2 (K = d GEMMs), chunk by chunk in L2
// (fused) or once for the batch (ATen path), instead of writing and re-reading 66 MB (resnet152-b1,
// batch 64). Those tensors are fresh anonymous mappings never written (zeros: the op stays a function of
// its inputs, as opcheck requires, at no page-fault cost), and the saved set is marked by storing the
// first layer's LayerNorm rstd negated (rstd = 1/sqrt(var + eps) is never negative in the ATen path's
// saved set; a mark in the values survives copies of the saved tensors).
Tensor zero_mapped(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto v : shape) n *= v;
  const size_t bytes = ((size_t)(n + kSlack) * sizeof(float) + 4095) / 4096 * 4096;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "slvit_fast: out of memory mapping ", bytes, " bytes");
  Tensor t = at::from_blob(p, {n + kSlack}, [bytes](void* q) { munmap(q, bytes); },
                           at::TensorOptions().dtype(at::kFloat));
  return t.narrow(0, 0, n).view(shape);
}

// True when saved rstd (the first layer's) carries the fused forward's mark: its first non-NaN value is
// negative (all NaN: unmarked).
bool recompute_marked(const Tensor& rstd1) {
  const Tensor r = rstd1.contiguous();
  const float* v = r.data_ptr<float>();
  for (int64_t i = 0; i < r.numel(); ++i)
    if (!std::isnan(v[i])) return v[i] < 0.f;
  return false;
}

#ifdef SLVIT_FUSED_AVX2
// ---- fused training path: GEMMs on the inference kernels' tiles (fused_train.h) ---------------------
// C (rows x cols, ldc) (+)= A B on the tiles of `isa`; A[r][k] at A + r*a_rs + k*a_ks, B row-major (ldb);
// the K loop may run over nseg segments (A, B jump by a_seg, b_seg). accumulate: C += A B in place
// (the epilogue adds C itself), how the per-worker weight gradients are summed over chunks.
static void tile_gemm(int isa, int64_t rows, int64_t cols, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate, int64_t nseg = 1,
                      int64_t a_seg = 0, int64_t b_seg = 0, const float* add = nullptr, int64_t ld_add = 0,
                      int act = slvit_fused::kNone) {
  if (rows <= 0 || cols <= 0) return;
  slvit_fused::Shape sh;
  sh.K = K; sh.a_rs = a_rs; sh.a_ks = a_ks; sh.ldb = ldb; sh.ldc = ldc;
  sh.nseg = nseg; sh.a_seg = a_seg; sh.b_seg = b_seg;
  slvit_fused::Epi e;
  e.act = act;
  if (accumulate) {
    e.add = C;
    e.ld_add = ldc;
  } else if (add) {
    e.add = add;
    e.ld_add = ld_add;
  }
  if (K <= 0) {  // an empty product: C = add (or unchanged when accumulating)
    if (!accumulate)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t cc = 0; cc < cols; ++cc) C[r * ldc + cc] = add ? add[r * ld_add + cc] : 0.f;
    return;
  }
  slvit_fused::gemm_tiles(isa, 0, rows, cols, sh, A, B, C, e);
}

static float* fptr(const Tensor& t) { return t.data_ptr<float>(); }
// A chunk's rows of a saved tensor are raw pointers (a narrow() per saved tensor and chunk cost ~3 us
// each through ATen, ~3% of a 1-thread step); fptr spells both the same.
static float* fptr(float* p) { return p; }

// Base pointer and floats per sample of tensors whose first dimension runs over the batch's samples.
struct SampleRows {
  std::vector<float*> base;
  std::vector<int64_t> per;
  SampleRows(const std::vector<Tensor>& ts, int64_t B) {
    for (const Tensor& t : ts) {
      base.push_back(fptr(t));
      per.push_back(t.numel() / B);
    }
  }
  float* at(int64_t k, int64_t b0) const { return base[k] + b0 * per[k]; }
};

// Weight gradient C (rows x cols) += dY^T X over ntok token rows: dY (ntok x rows, row stride ldy) read
// transposed through the A strides, X (ntok x cols, ldb) the B operand. Token blocks of 32: each pass
// streams 32 whole rows of X in memory order (reading a 32-column strip of all ntok rows instead, one
// cache line per row 4-8 KB apart, left the patch-embedding gradient waiting on memory), and the
// accumulator C stays in L2 between passes.
static void dw_gemm(int isa, int64_t rows, int64_t cols, int64_t ntok, const float* dY, int64_t ldy, const float* X,
                    int64_t ldb, float* C) {
  constexpr int64_t kTok = 32;
  for (int64_t k0 = 0; k0 < ntok; k0 += kTok)
    tile_gemm(isa, rows, cols, std::min(kTok, ntok - k0), dY + k0 * ldy, 1, ldy, X + k0 * ldb, ldb, C, cols, true);
}
using slvit_train::colsum_add;

// A contiguous float32 copy of w with kSlack readable floats after it (weights read as a B operand).
static Tensor slack_copy(const Tensor& w) {
  Tensor t = empty_slack(w.sizes());
  t.copy_(w);
  return t;
}

// Weights of the fused backward, built once per call (B operands need kSlack floats after them).
struct FusedBwdWeights {
  // per layer; W1T, WqkvT / bqkv: B operands and bias of fc1 and Q/K/V, to recompute hpre and qkv
  std::vector<Tensor> Wqkv, W1, W2, Wo, W1T, WqkvT, bqkv;
  Tensor Wp;  // the patch embedding's weight (d x P, gather column order): B operand of dx's patch rows

};

// Per-worker buffers of one chunk of the fused backward (reused across the worker's chunks).
struct FusedBwdBufs {
  Tensor keep;
  // pm: one sample's patch rows, gathered again from x, then its dx rows; hpre (then gelu'(hpre)) / hact /
  // qkv: recomputed
  float *dm, *dh, *dy, *dO, *dqkv, *scr, *mask, *pm, *hpre, *hact, *qkv, *dt1;
};

static FusedBwdBufs fused_bwd_bufs(const Cfg& c, int64_t cs) {
  const int64_t n = cs * c.T;
  auto r = [](int64_t v) { return (v + kSlack + 15) / 16 * 16; };
  const int64_t nmask = c.thr_attn > 0 ? cs * c.heads * c.T * c.T : 0;
  const int64_t sizes[12] = {r(n * c.d), r(n * c.mlp), r(n * c.d), r(n * c.A), r(n * 3 * c.A),
                             r(slvit_train::attn_scratch_floats(c.T, c.kd)), r(nmask), r(c.Np * c.P),
                             r(n * c.mlp), r(n * c.mlp), r(n * 3 * c.A), r(n * c.d)};
  int64_t total = 0;
  for (int64_t v : sizes) total += v;
  FusedBwdBufs b;
  b.keep = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
  float* q = fptr(b.keep);
  float** dst[12] = {&b.dm, &b.dh, &b.dy, &b.dO, &b.dqkv, &b.scr, &b.mask, &b.pm, &b.hpre, &b.hact, &b.qkv, &b.dt1};
  for (int i = 0; i < 12; ++i) {
    *dst[i] = q;
    q += sizes[i];
  }
  return b;
}

// Sum of term(k), k < d, in 8 interleaved partial sums combined in a fixed order: 8 independent chains
// the compiler puts in vector lanes, where one running sum is a d-step latency chain per row.
template <class F>
static inline float sum8(int64_t d, F term) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t k = 0;
  for (; k + 8 <= d; k += 8)
    for (int j = 0; j < 8; ++j) a[j] += term(k + j);
  float s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  for (; k < d; ++k) s += term(k);
  return s;
}

// LayerNorm of n rows of d floats on the calling thread, as ATen's native_layer_norm (biased variance,
// rstd = 1 / sqrt(var + eps)), with no op dispatch, allocation or parallel region per chunk.
static void ln_forward(const float* x, int64_t n, int64_t d, const float* g, const float* b, double eps, float* y,
                       float* mean, float* rstd) {
  const float inv_d = 1.f / (float)d;
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * d;
    const float mu = sum8(d, [&](int64_t k) { return xr[k]; }) * inv_d;
    const float var = sum8(d, [&](int64_t k) { return (xr[k] - mu) * (xr[k] - mu); }) * inv_d;
    const float rs = 1.f / std::sqrt(var + (float)eps);
    mean[r] = mu;
    rstd[r] = rs;
    float* yr = y + r * d;
    for (int64_t k = 0; k < d; ++k) yr[k] = (xr[k] - mu) * rs * g[k] + b[k];
  }
}

// Its backward: dx = rstd (dy g - mean(dy g) - xhat mean(dy g xhat)) (+ res, the residual gradient,
// when given), dgamma += sum of dy xhat and dbeta += sum of dy over the rows (in row order).
static void ln_backward(const float* dy, const float* x, const float* mean, const float* rstd, const float* g, int64_t n,
                        int64_t d, const float* res, float* dx, float* dgamma, float* dbeta) {
  const float inv_d = 1.f / (float)d;
  for (int64_t r = 0; r < n; ++r) {
    const float *dyr = dy + r * d, *xr = x + r * d;
    const float mu = mean[r], rs = rstd[r];
    const float s1 = sum8(d, [&](int64_t k) { return dyr[k] * g[k]; }) * inv_d;
    const float s2 = sum8(d, [&](int64_t k) { return dyr[k] * g[k] * ((xr[k] - mu) * rs); }) * inv_d;
    float* dxr = dx + r * d;
    const float* rr = res ? res + r * d : nullptr;
    for (int64_t k = 0; k < d; ++k) {
      const float xh = (xr[k] - mu) * rs;
      dgamma[k] += dyr[k] * xh;
      dbeta[k] += dyr[k];
      const float v = rs * (dyr[k] * g[k] - s1 - xh * s2);
      dxr[k] = rr ? v + rr[k] : v;
    }
  }
}

// The fused backward of one chunk (c.B samples from b0): same inputs/outputs as backward_chunk, token-major
// on the GEMM tiles; the weight and bias gradients of the encoder and embedding are accumulated in place
// into this worker's acc (pre-zeroed), the rest (head, LayerNorm affine, position, extra) through acc_add.
static void backward_chunk_fused(int isa, const Tensor& dt_rows, const Tensor& x_rows, const c10::optional<Tensor>& extra,
                                 const std::vector<Tensor>& p, float* const* saved, const BwdWeights& bw,
                                 const FusedBwdWeights& fw, const FusedBwdBufs& buf, const Cfg& c, Tensor* dx_rows,
                                 Tensor* dextra_rows, std::vector<Tensor>& acc, int64_t b0, bool regather_pm) {
  const int64_t n = c.B * c.T, d = c.d, A = c.A, A3 = 3 * c.A, mlp = c.mlp;
  Tensor dt = dt_rows;  // gradient of the last layer's output (the head's backward ran for the batch)

  const float scale = 1.0f / std::sqrt((float)c.kd);
  const int64_t layer0 = 3 + (c.E ? 2 : 0);
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    const int64_t pi = layer0 + l * kPerLayer;
    float* const* s = saved + 1 + l * kSavedPerLayer;  // this chunk's rows of the layer's saved tensors
    float *t_in = s[0], *mean1 = s[1], *rstd1 = s[2], *y1 = s[3], *qkv = s[4], *P = s[5], *o = s[6], *t1 = s[7],
          *mean2 = s[8], *rstd2 = s[9], *y2 = s[10], *hpre = s[11], *hact = s[12];
    const Tensor &g1 = p[pi], &g2 = p[pi + 10];

    // the MLP hidden activations: saved (ATen-path layout) or recomputed from the saved y2. Recomputed,
    // GELU and its derivative come from one pass (one erf per element; the backward below evaluated it
    // again from hpre): buf.hpre then holds gelu'(hpre) - hpre itself is needed for nothing else.
    const float* hpre_p = fptr(hpre);
    const float* hact_p = fptr(hact);
    const float* dgelu = nullptr;  // gelu'(hpre) when recomputed
    if (regather_pm) {
      RECORD_FUNCTION("slvit_cpu::bwd_recompute_fc1", std::vector<c10::IValue>());
      tile_gemm(isa, n, mlp, d, fptr(y2), d, 1, fptr(fw.W1T[l]), mlp, buf.hpre, mlp, false, 1, 0, 0, fptr(p[pi + 13]),
                0);
      slvit_fused::gelu_forward_grad(isa, buf.hpre, buf.hact, buf.hpre, n * mlp);
      dropout_apply(buf.hact, n * mlp, b0 * c.T * mlp, 3 + 3 * l, c.thr_drop, c.seed);
      hpre_p = nullptr;
      dgelu = buf.hpre;
      hact_p = buf.hact;
    }
    // MLP block. dm: gradient of the fc2 output before its dropout (the residual path is not dropped)
    const float* dm = fptr(dt);
    if (c.thr_drop > 0) {
      std::memcpy(buf.dm, dm, n * d * sizeof(float));
      dropout_apply(buf.dm, n * d, b0 * c.T * d, 4 + 3 * l, c.thr_drop, c.seed);
      dm = buf.dm;
    }
    colsum_add(dm, n, d, d, fptr(acc[pi + 15]));
    // dW2 += dm^T hact;  dh = (dm W2) * dropout mask * gelu'(hpre)
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dW2", std::vector<c10::IValue>());
      dw_gemm(isa, d, mlp, n, dm, d, hact_p, mlp, fptr(acc[pi + 14]));
    }
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dh", std::vector<c10::IValue>());
      tile_gemm(isa, n, mlp, d, dm, d, 1, fptr(fw.W2[l]), mlp, buf.dh, mlp, false);
    }
    dropout_apply(buf.dh, n * mlp, b0 * c.T * mlp, 3 + 3 * l, c.thr_drop, c.seed);
    {
      RECORD_FUNCTION("slvit_cpu::gelu_backward", std::vector<c10::IValue>());
      if (dgelu) {  // dh *= gelu'(hpre) and the fc1 bias gradient in one pass
        slvit_train::mul_colsum_add(buf.dh, dgelu, n, mlp, fptr(acc[pi + 13]));
      } else {
        slvit_fused::gelu_backward(buf.dh, hpre_p, buf.dh, n * mlp);
        colsum_add(buf.dh, n, mlp, mlp, fptr(acc[pi + 13]));
      }
    }
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dW1", std::vector<c10::IValue>());
      dw_gemm(isa, mlp, d, n, buf.dh, mlp, fptr(y2), d, fptr(acc[pi + 12]));  // dW1 += dh^T y2
    }
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dy2", std::vector<c10::IValue>());
      tile_gemm(isa, n, d, mlp, buf.dh, mlp, 1, fptr(fw.W1[l]), d, buf.dy, d, false);  // dy2 = dh W1
    }
    {
      RECORD_FUNCTION("slvit_cpu::bwd_ln2", std::vector<c10::IValue>());
      ln_backward(buf.dy, fptr(t1), fptr(mean2), fptr(rstd2), fptr(g2), n, d, c.residual ? fptr(dt) : nullptr, buf.dt1,
                  fptr(acc[pi + 10]), fptr(acc[pi + 11]));
    }
    float* dt1 = buf.dt1;

    // attention block
    colsum_add(dt1, n, d, d, fptr(acc[pi + 9]));
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dWo_dO", std::vector<c10::IValue>());
      dw_gemm(isa, d, A, n, dt1, d, fptr(o), A, fptr(acc[pi + 8]));  // dWo += dt1^T o
      tile_gemm(isa, n, A, d, dt1, d, 1, fptr(fw.Wo[l]), A, buf.dO, A, false);     // dO = dt1 Wo
    }
    float* mask = nullptr;
    if (c.thr_attn > 0) {
      const int64_t nm = c.B * c.heads * c.T * c.T;
      std::fill_n(buf.mask, nm, 1.f);
      dropout_apply(buf.mask, nm, b0 * c.heads * c.T * c.T, 2 + 3 * l, c.thr_attn, c.seed);
      mask = buf.mask;
    }
    {
      RECORD_FUNCTION("slvit_cpu::attn_backward", std::vector<c10::IValue>());
      slvit_train::AttnChunk ac;
      ac.isa = isa; ac.S = c.B; ac.T = c.T; ac.heads = c.heads; ac.kd = c.kd; ac.A = A; ac.scale = scale;
      const float* qkvp = fptr(qkv);
      if (regather_pm) {  // Q/K/V were not saved: recompute them from the saved y1 (a K = d GEMM)
        tile_gemm(isa, n, A3, d, fptr(y1), d, 1, fptr(fw.WqkvT[l]), A3, buf.qkv, A3, false, 1, 0, 0,
                  fptr(fw.bqkv[l]), 0);
        qkvp = buf.qkv;
      }
      ac.qkv = qkvp; ac.P = fptr(P); ac.mask = mask; ac.o = nullptr; ac.dO = buf.dO; ac.dqkv = buf.dqkv;
      ac.scratch = buf.scr;
      slvit_train::attn_backward_chunk(ac);
    }
    RECORD_FUNCTION("slvit_cpu::bwd_dWqkv_dy1", std::vector<c10::IValue>());
    for (int j = 0; j < 3; ++j) {
      // dW{q,k,v} += dqkv[:, jA:(j+1)A]^T y1;  db{q,k,v} += column sums
      dw_gemm(isa, A, d, n, buf.dqkv + j * A, A3, fptr(y1), d, fptr(acc[pi + 2 + 2 * j]));
      colsum_add(buf.dqkv + j * A, n, A, A3, fptr(acc[pi + 3 + 2 * j]));
    }
    tile_gemm(isa, n, d, A3, buf.dqkv, A3, 1, fptr(fw.Wqkv[l]), d, buf.dy, d, false);  // dy1 = dqkv Wqkv
    // the layer input's gradient, into dt's rows (dt itself is no longer needed)
    ln_backward(buf.dy, fptr(t_in), fptr(mean1), fptr(rstd1), fptr(g1), n, d, dt1, fptr(dt), fptr(acc[pi]),
                fptr(acc[pi + 1]));
  }

  // embedding (dt: gradient of the embedding's output after its dropout)
  float* dtp = fptr(dt);
  dropout_apply(dtp, n * d, b0 * c.T * d, 0, c.thr_drop, c.seed);
  {
    float* dpos = fptr(acc[2]);
    for (int64_t b = 0; b < c.B; ++b) {
      const float* src = dtp + b * c.T * d;
      for (int64_t k = 0; k < c.Np * d; ++k) dpos[k] += src[k];
      colsum_add(src, c.Np, d, d, fptr(acc[1]));
    }
  }
  // dWp += dtp^T pm over the patch tokens of each sample, in pm's column order; the patch rows are
  // gathered again from x (the forward did not save them) sample by sample into this worker's buffer, so
  // each sample's rows (400 KB at resnet152-b1) are still in L2 for its GEMM (a chunk's 2 MB were not).
  // dx, when wanted, the same way: the sample's patch-row gradient dtp Wp on the tiles into that buffer
  // (its gathered rows are done with), scattered into dx while in L2 - an ATen mm for the chunk
  // allocated and wrote 1.6 MB per chunk first
  const float* pmp = fptr(saved[0]);
  Cfg c1 = c;
  c1.B = 1;
  for (int64_t b = 0; b < c.B; ++b) {
    const float* pmb = pmp + b * c.Np * c.P;
    if (regather_pm) {
      RECORD_FUNCTION("slvit_cpu::patch_gather", std::vector<c10::IValue>());
      float* xb = x_rows.data_ptr<float>() + b * x_rows.stride(0);
      patch_permute_layout(false, bw.cl, xb, x_rows.strides().data(), buf.pm, c1);
      pmb = buf.pm;
    }
    {
      RECORD_FUNCTION("slvit_cpu::bwd_dWp", std::vector<c10::IValue>());
      dw_gemm(isa, d, c.P, c.Np, dtp + b * c.T * d, d, pmb, c.P, fptr(acc[0]));
    }
    if (dx_rows) {
      RECORD_FUNCTION("slvit_cpu::bwd_dx", std::vector<c10::IValue>());
      tile_gemm(isa, c.Np, c.P, d, dtp + b * c.T * d, d, 1, fptr(fw.Wp), c.P, buf.pm, c.P, false);
      float* dxb = dx_rows->data_ptr<float>() + b * dx_rows->stride(0);
      patch_permute_layout(true, bw.cl, dxb, dx_rows->strides().data(), buf.pm, c1);
    }
  }
  Tensor dt3 = dt.view({c.B, c.T, d});
  if (c.E) {
    Tensor dte = dt3.narrow(1, c.Np, c.E).contiguous().view({c.B * c.E, d});
    Tensor extraf = extra->to(at::kFloat).contiguous().view({c.B * c.E, c.De});
    acc_add(acc, 3, at::mm(dte.t(), extraf));
    acc_add(acc, 4, dte.sum(0));
    dextra_rows->copy_(at::mm(dte, p[3]).view({c.B, c.E, c.De}));
  }
}

// ---- work schedule of the fused path -------------------------------------------------------------------
// The batch is cut into kGroups groups of decreasing size (group_start; fewer groups when B < kGroups), and each
// group into chunks of about kChunkRows token rows, at least one sample each (SLVIT_FAST_CPU_TRAIN_CHUNK
// forces the samples per chunk) - from B and T only, never from the thread
// count. Workers claim chunks (forward) or groups (backward) from an atomic counter, so a worker slowed
// down by the other tenants of a shared core takes fewer and nobody waits for it (the static split -
// nw contiguous sample ranges, one per worker - waited for the slower core); the small last groups keep
// the workers' finishing times within about one small group. Every group accumulates its parameter gradients in its own slot and the
// slots are summed in group order (Slots): the gradients are the same bits for any thread count and any
// timing, as is everything else (each chunk's sums run in a fixed order on fixed rows; the head's GEMMs
// run in fixed blocks, head_mm). Memory: one slot holds the encoder and embedding gradients (not the
// head's, computed once for the batch): 184k floats = 0.74 MB at resnet152-b1; at most kGroups slots
// exist (5.9 MB), and usually 1-3 are in use (a slot is folded and reused as soon as its group is done).
// SLVIT_FAST_CPU_TRAIN_SCHED=static (benchmark knob, for old-vs-new timings in one process): the old static
// split with per-worker accumulators and ATen-threaded head GEMMs (results then depend on the thread
// count); unset/"dynamic": the above.
// kChunkRows: the backward holds three n x mlp chunk buffers at once (gelu'(hpre), hact, dh) next to the
// forward's fc1 output; at 256 rows (resnet152-b1: 4 samples) they were ~2.4 MB, over a 2 MB L2, and the
// MLP's GEMMs and GELU waited on L3. At ~48 rows (one 49-token sample, two 25-token ones) they are
// ~0.6 MB: measured interleaved at batch 64, 2 threads, the step 8-16% faster for resnet152-b1 and
// 5-8% for inceptionv3-b1 (T = 25) than at 256 rows; 32 and 64 rows measured alike.
static constexpr int64_t kChunkRows = 48, kGroups = 8;

struct Schedule {
  bool dynamic = true;
  int64_t cs = 1;      // samples of the largest chunk (buffers)
  int64_t groups = 1;  // accumulation groups (static: workers)
  int64_t nw_fwd = 1, nw_bwd = 1;       // workers of the forward (claiming chunks) and the backward (groups)
  std::vector<int64_t> chunk_b0;        // chunk k: samples [chunk_b0[k], chunk_b0[k + 1])
  std::vector<int64_t> group_chunk;     // group g: chunks [group_chunk[g], group_chunk[g + 1])
  int64_t nch() const { return (int64_t)chunk_b0.size() - 1; }
};

// SLVIT_FAST_CPU_TRAIN_SCHED: "dynamic" (default), "equal" (dynamic claiming of equal groups, session 6's
// partition; benchmark knob) or "static".
static std::string train_schedule() {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_SCHED");
  const std::string v = env ? env : "";
  TORCH_CHECK(v.empty() || v == "dynamic" || v == "equal" || v == "static", "slvit_fast: SLVIT_FAST_CPU_TRAIN_SCHED='",
              v, "' is not a schedule; use dynamic (default), equal or static");
  return v.empty() ? "dynamic" : v;
}

// First sample of group g of G (g = G: B). Decreasing group sizes: each group gets one sample plus a share
// of the rest proportional to 2G - 2g - 1 (B = 64, G = 8: 14, 13, 10, 9, 7, 6, 3, 2). Workers claim groups in
// order, so the last claims are small and a worker that finishes early waits at most ~one small group
// for the other; with equal groups (8 samples each) a core slowed by another tenant left the faster one
// idle for up to a whole group at the end of every backward. The partition depends on B and G only, so
// the gradients stay the same bits for any thread count.
static int64_t group_start(int64_t B, int64_t G, int64_t g, bool equal) {
  if (equal) return B * g / G;
  return g + ((B - G) * (g * (2 * G - g)) + G * G / 2) / (G * G);  // rounded
}

static Schedule make_schedule(const Cfg& c) {
  Schedule s;
  const std::string sched = train_schedule();
  s.dynamic = sched != "static";
  const bool equal = sched == "equal";
  if (!s.dynamic) {
    int64_t nw;
    train_split(c, nw, s.cs, true);
    s.groups = s.nw_fwd = s.nw_bwd = nw;
    return s;
  }
  const int64_t forced = forced_train_chunk();
  s.groups = std::min(kGroups, c.B);
  s.chunk_b0.push_back(0);
  s.group_chunk.push_back(0);
  for (int64_t g = 0; g < s.groups; ++g) {
    const int64_t s0 = group_start(c.B, s.groups, g, equal), ns = group_start(c.B, s.groups, g + 1, equal) - s0;
    const int64_t nc = forced > 0 ? (ns + forced - 1) / forced
                                  : std::clamp<int64_t>((ns * c.T + kChunkRows - 1) / kChunkRows, 1, ns);
    for (int64_t j = 1; j <= nc; ++j) {
      const int64_t b = forced > 0 ? std::min(s0 + j * forced, s0 + ns) : s0 + ns * j / nc;
      s.cs = std::max(s.cs, b - s.chunk_b0.back());
      s.chunk_b0.push_back(b);
    }
    s.group_chunk.push_back(s.nch());
  }
  const bool small = c.B * c.T < kSingleThreadRows && forced <= 0;
  const int64_t threads = (small || at::in_parallel_region()) ? 1 : std::max(1, at::get_num_threads());
  s.nw_fwd = std::min(threads, s.nch());
  s.nw_bwd = std::min(threads, s.groups);
  return s;
}

// Runs f(w, u) for every unit u < nunits, claimed in order by nw workers of one parallel region (with the
// caller's grad/inference mode; BLAS single-threaded inside); w: the claiming worker (its buffers).
template <class F>
static void run_claimed(int64_t nw, int64_t nunits, F f) {
  if (nw <= 1) {
    SingleThreadScope single(true);
    for (int64_t u = 0; u < nunits; ++u) f(0, u);
    return;
  }
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nw, 1, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard tls(caller_state);
    SequentialBlas seq;
    for (int64_t w = lo; w < hi; ++w)
      for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < nunits;
           u = next.fetch_add(1, std::memory_order_relaxed))
        f(w, u);
  });
}

// Forward: f(w, b0, n) for every chunk.
template <class F>
static void forward_chunks(const Cfg& c, const Schedule& s, F f) {
  if (!s.dynamic) return for_train_chunks(c, f, true);
  run_claimed(s.nw_fwd, s.nch(), [&](int64_t w, int64_t k) { f(w, s.chunk_b0[k], s.chunk_b0[k + 1] - s.chunk_b0[k]); });
}


// The head's GEMMs, out (B x N, any strides) = a (B x K) bt (K x N) (+ bias), in kHeadBlocks fixed
// column blocks of out (each a serial BLAS call on one claiming worker): the same bits for any thread
// count - MKL's own threading splits the work by the thread count, and its last bits follow the split.
// Column blocks of the forward GEMMs are row blocks of the head weight: no worker streams all of it.
static constexpr int64_t kHeadBlocks = 4;
static constexpr double kHeadParallelFlops = 4e6;
// (fixed = false: the static schedule's one ATen call on ATen's threads.)
static void head_mm(Tensor out, const Tensor* bias, const Tensor& a, const Tensor& bt, int64_t nw, bool fixed = true) {
  if (!fixed) {
    if (bias) at::addmm_out(out, *bias, a, bt); else at::mm_out(out, a, bt);
    return;
  }
  const int64_t N = out.size(1), nb = std::min(kHeadBlocks, N);
  // a small GEMM (the output layer's three, ~0.3 MFLOP at resnet152-b1) stays on the calling thread: a
  // parallel region's wake-up and barrier cost more, milliseconds when the cores are shared
  if (2.0 * (double)out.size(0) * (double)N * (double)a.size(1) < kHeadParallelFlops) nw = 1;
  run_claimed(std::min(nw, nb), nb, [&](int64_t, int64_t j) {
    const int64_t lo = N * j / nb, n = N * (j + 1) / nb - lo;
    Tensor o = out.narrow(1, lo, n);
    if (bias)
      at::addmm_out(o, bias->narrow(0, lo, n), a, bt.narrow(1, lo, n));
    else
      at::mm_out(o, a, bt.narrow(1, lo, n));
  });
}

// Column sums of a contiguous float32 matrix in row order (serial: ATen's sum may split the rows by thread).
static Tensor colsum(const Tensor& m, bool fixed = true) {
  if (!fixed) return m.sum(0);
  Tensor s = at::zeros({m.size(1)}, at::TensorOptions().dtype(at::kFloat));
  slvit_train::colsum_add(m.data_ptr<float>(), m.size(0), m.size(1), m.size(1), s.data_ptr<float>());
  return s;
}

// Accumulation slots of the backward: nslots slots of one float buffer, each holding params [0, nparams)
// at 16-float aligned offsets (acc[slot][i] views them). A group takes a free slot (zeroed; the most
// recently freed one, still in L2), accumulates its chunks into it, and on finishing hands it back
// with finish(g): the groups' slots are folded into the sum in group order - group g as soon as groups
// 0..g have finished, by whichever worker finishes the last of them - so the sum is ((s0 + s1) + s2) +
// ... element by element whatever the timing, and a slot is folded while it is still in cache (a fold
// of all slots after the parallel region read 13 cold slots per resnet152-b1 step: ~4 ms at 1 thread).
// A worker never waits for another's fold (the folding_ flag is only claimed with a compare-exchange,
// which unlike try_lock cannot fail spuriously; the folder re-checks for newly ready groups after
// releasing it): on shared cores a folder can be descheduled mid-fold for milliseconds.
class Slots {
  Tensor buf_;
  int64_t per_slot_ = 0, ngroups_ = 0, next_ = 0;  // next_: the first group not folded yet
  std::vector<int64_t> off_, free_, ready_;
  std::vector<Tensor> sum_;
  std::mutex mu_;       // free_, ready_, next_ (short sections)
  std::atomic<bool> folding_{false};  // set by the one worker folding (acquire/release orders sum_)

  // the slot of group next_ when it is ready to fold, else -1
  int64_t foldable() {
    std::lock_guard<std::mutex> g(mu_);
    return next_ < ngroups_ ? ready_[next_] : -1;
  }

  void fold(int64_t slot, bool first) {
    const float* base = buf_.data_ptr<float>() + slot * per_slot_;
    for (size_t i = 0; i < sum_.size(); ++i) {
      float* o = sum_[i].data_ptr<float>();
      const float* src = base + off_[i];
      const int64_t n = sum_[i].numel();
      if (first)
        std::memcpy(o, src, n * sizeof(float));
      else
        for (int64_t k = 0; k < n; ++k) o[k] += src[k];
    }
  }

 public:
  std::vector<std::vector<Tensor>> acc;  // acc[slot][i]: views for i < nparams, undefined above

  // ngroups groups, at most ngroups slots (all of them when every later group finishes before group 0)
  Slots(const std::vector<Tensor>& p, int64_t nparams, int64_t ngroups) : ngroups_(ngroups) {
    off_.resize(nparams);
    for (int64_t i = 0; i < nparams; ++i) {
      off_[i] = per_slot_;
      per_slot_ += (p[i].numel() + 15) / 16 * 16;
    }
    // from the saved pool: a fresh buffer per step costs page faults
    buf_ = pooled_slack({std::max<int64_t>(ngroups * per_slot_, 1)});
    acc.assign(ngroups, std::vector<Tensor>(p.size()));
    for (int64_t s = 0; s < ngroups; ++s)
      for (int64_t i = 0; i < nparams; ++i)
        acc[s][i] = buf_.narrow(0, s * per_slot_ + off_[i], p[i].numel()).view(p[i].sizes());
    for (int64_t s = ngroups - 1; s >= 0; --s) free_.push_back(s);
    ready_.assign(ngroups, -1);
    for (int64_t i = 0; i < nparams; ++i) sum_.push_back(at::empty(p[i].sizes(), at::TensorOptions().dtype(at::kFloat)));
  }

  int64_t take() {
    int64_t s;
    {
      std::lock_guard<std::mutex> g(mu_);
      TORCH_CHECK(!free_.empty(), "slvit_fast: internal error: no free accumulation slot");
      s = free_.back();
      free_.pop_back();
    }
    RECORD_FUNCTION("slvit_cpu::bwd_zero_slot", std::vector<c10::IValue>());
    std::memset(buf_.data_ptr<float>() + s * per_slot_, 0, per_slot_ * sizeof(float));
    return s;
  }

  void finish(int64_t group, int64_t slot) {
    RECORD_FUNCTION("slvit_cpu::bwd_fold_slots", std::vector<c10::IValue>());
    {
      std::lock_guard<std::mutex> g(mu_);
      ready_[group] = slot;
    }
    while (foldable() >= 0) {
      bool idle = false;
      if (!folding_.compare_exchange_strong(idle, true, std::memory_order_acquire))
        return;  // the folder will see this group when it re-checks
      for (int64_t s; (s = foldable()) >= 0;) {
        fold(s, next_ == 0);  // (next_ changes only here, while folding_ is held)
        std::lock_guard<std::mutex> g(mu_);
        free_.push_back(s);
        ++next_;
      }
      folding_.store(false, std::memory_order_release);
    }
  }

  // The sum of all groups (call after every group finished).
  std::vector<Tensor> sum() {
    TORCH_CHECK(next_ == ngroups_, "slvit_fast: internal error: ", ngroups_ - next_, " groups not folded");
    return std::move(sum_);
  }
};

// Backward: f(w, slot, b0, n) for every chunk of a group, in sample order, into the group's accumulation
// slot (Slots: taken when the group starts, finished when it ends). Static schedule: a worker's samples
// are its group, finished in worker order after the parallel region.
template <class F>
static void backward_chunks(const Cfg& c, const Schedule& s, Slots& slots, F f) {
  if (!s.dynamic) {
    std::vector<int64_t> slot(s.nw_bwd, -1);
    for (int64_t w = 0; w < s.nw_bwd; ++w) slot[w] = slots.take();
    for_train_chunks(c, [&](int64_t w, int64_t b0, int64_t n) { f(w, slot[w], b0, n); }, true);
    for (int64_t w = 0; w < s.nw_bwd; ++w) slots.finish(w, slot[w]);
    return;
  }
  run_claimed(s.nw_bwd, s.groups, [&](int64_t w, int64_t g) {
    const int64_t slot = slots.take();
    for (int64_t k = s.group_chunk[g]; k < s.group_chunk[g + 1]; ++k)
      f(w, slot, s.chunk_b0[k], s.chunk_b0[k + 1] - s.chunk_b0[k]);
    slots.finish(g, slot);
  });
}

// The fused training forward: every worker runs its chunks of samples token-major on the GEMM tiles
// (weights transposed once per call into B operands), writing the same saved tensors, in the same
// layout, as forward_impl (so either backward reads them); the head runs once for the batch after the
// parallel region (per chunk it streamed the whole head weight for a few rows).
void train_forward_fused(int isa, const Tensor& x, const c10::optional<Tensor>& extra, const std::vector<Tensor>& p,
                         const Cfg& c, double eps, std::vector<Tensor>& sink, Tensor& out, bool save_all) {
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const int64_t d = c.d, A = c.A, A3 = 3 * c.A, mlp = c.mlp, T = c.T, Np = c.Np;
  // The weight preparation below is a dozen small ATen ops (copies of 10-260 KB): each would open its
  // own OpenMP region, 5-20 us when the machine is idle and milliseconds when the other core is busy
  // (profiled on the shared VM: a 256 KB permute copy took 4.7 ms inside a training step, 21 us alone),
  // so they run on the calling thread; the scope ends before the parallel chunks.
  Tensor xf = x.to(at::kFloat);  // (a half-precision x is converted on ATen's threads: it can be large)
  std::optional<SingleThreadScope> prep_single;
  prep_single.emplace(true);
  const bool cl = x_channels_inner(xf);
  // B operands (transposed weights, with slack) and bias vectors, once per call
  int64_t pi = 0;
  const Tensor &Wp0 = p[pi++], &bp = p[pi++], &pos = p[pi++];
  Tensor Wp = cl ? Wp0 : Wp0.view({d, c.ph, c.pw, c.C}).permute({0, 3, 1, 2}).contiguous().view({d, c.P});
  Tensor WpT = slack_copy(Wp.t());
  Tensor bias_pos = pos.add(bp).contiguous();  // (Np, d)
  // The patch embedding straight from x's NCHW rows (patch_embed_avx512.cpp; the inference forward's
  // kernel), feature-major per sample, where it applies: AVX-512 tiles, unit pixel stride, the patch
  // widths / rows of embed_rows_wanted, SLVIT_FAST_CPU_EMBED not "gather" (read first: an invalid value
  // is an error on every path). Wp above is then already in its (e, c, i, j) order.
  const bool direct_wanted = embed_direct_wanted();
  const bool direct = direct_wanted && !save_all && !cl && isa == slvit_fused::kIsaAvx512 && xf.stride(3) == 1 &&
                      slvit_fused::embed_rows_wanted(c.pw, c.W);
  Tensor We, be;
  if (c.E) { We = p[pi++]; be = p[pi++]; }
  struct LW { Tensor WqkvT, bqkv, WoT, W1T, W2T; };
  std::vector<LW> lw(c.layers);
  for (int64_t l = 0; l < c.layers; ++l) {
    const int64_t q = pi + l * kPerLayer;
    lw[l].WqkvT = slack_copy(at::cat({p[q + 2], p[q + 4], p[q + 6]}, 0).t());
    lw[l].bqkv = at::cat({p[q + 3], p[q + 5], p[q + 7]}, 0);
    lw[l].WoT = slack_copy(p[q + 8].t());
    lw[l].W1T = slack_copy(p[q + 12].t());
    lw[l].W2T = slack_copy(p[q + 14].t());
  }
  const int64_t head0 = (int64_t)p.size() - 4;
  const int64_t nsaved = (int64_t)sink.size();
  prep_single.reset();  // before the schedule: it reads the thread count
  const Schedule sch = make_schedule(c);
  const int64_t cs = sch.cs;
  // per-sample (bias + position) rows repeated for a chunk: the add operand of the embedding GEMM over a
  // chunk's saved patch matrix (SAVE_ALL; otherwise the GEMM runs per sample on bias_pos itself)
  Tensor add_chunk = save_all ? bias_pos.repeat({cs, 1}).contiguous() : Tensor();
  std::vector<Tensor> scr(sch.nw_fwd);
  const float scale = 1.0f / std::sqrt((float)c.kd);
  Tensor extraf = c.E ? extra->to(at::kFloat).contiguous() : Tensor();

  const SampleRows sink_rows(sink, c.B);
  forward_chunks(c, sch, [&](int64_t w, int64_t b0, int64_t S) {
    const int64_t n = S * T;
    Cfg cc = c;
    cc.B = S;
    if (!scr[w].defined()) {
      const int64_t nmask = c.thr_attn > 0 ? cs * c.heads * T * T : 0;
      // (one sample's patch rows: the gather goes sample by sample, or into the saved patch matrix)
      scr[w] = at::empty({slvit_train::attn_scratch_floats(T, c.kd) + nmask + Np * std::max(c.P, d) +
                          cs * T * (mlp + A3) + 3 * kSlack + 64}, fopt);
    }
    float* ascr = fptr(scr[w]);
    const int64_t nascr = slvit_train::attn_scratch_floats(T, c.kd);
    float* mask = c.thr_attn > 0 ? ascr + nascr : nullptr;
    float* pmbuf = ascr + nascr + (c.thr_attn > 0 ? cs * c.heads * T * T : 0);
    float* hbuf = pmbuf + Np * std::max(c.P, d) + kSlack;  // the MLP hidden activations when they are not saved
    float* qbuf = hbuf + cs * T * mlp + kSlack;     // Q/K/V when they are not saved
    auto rows = [&](int64_t k) { return sink_rows.at(k, b0); };  // this chunk's rows of saved tensor k
    // 1. patches (into this worker's buffer, not saved) -> embedding + bias + position; extra tokens; dropout
    float* pm = save_all ? rows(0) : pmbuf;
    Tensor xc = xf.narrow(0, b0, S);
    float* t = rows(1);
    if (direct) {
      // sample by sample into pmbuf (d x Np, feature-major), then token-major into t with bias + position
      const float* bpos = fptr(bias_pos);
      for (int64_t b = 0; b < S; ++b) {
        RECORD_FUNCTION("slvit_cpu::fwd_embed", std::vector<c10::IValue>());
        slvit_fused::embed_rows_avx512(xc.data_ptr<float>() + b * xc.stride(0), xc.stride(1), xc.stride(2), c.C, c.ph,
                                       c.pw, c.gh, c.gw, fptr(Wp), c.P, d, pmbuf, Np, nullptr, 0, nullptr);
        float* tb = fptr(t) + b * T * d;
        for (int64_t m = 0; m < Np; ++m)
          for (int64_t e = 0; e < d; ++e) tb[m * d + e] = pmbuf[e * Np + m] + bpos[m * d + e];
      }
    } else if (!save_all) {
      // sample by sample, each sample's patch rows (400 KB at resnet152-b1) embedded right after they
      // are gathered, while they are still in L2 (a whole chunk's, 1.6 MB, were partly evicted by the
      // gather itself before the GEMM read them); the same per-element sums as one GEMM over the chunk
      Cfg c1 = c;
      c1.B = 1;
      for (int64_t b = 0; b < S; ++b) {
        {
          RECORD_FUNCTION("slvit_cpu::patch_gather", std::vector<c10::IValue>());
          patch_permute_layout(false, cl, xc.data_ptr<float>() + b * xc.stride(0), xc.strides().data(), pmbuf, c1);
        }
        RECORD_FUNCTION("slvit_cpu::fwd_embed", std::vector<c10::IValue>());
        tile_gemm(isa, Np, d, c.P, pmbuf, c.P, 1, fptr(WpT), d, fptr(t) + b * T * d, d, false, 1, 0, 0,
                  fptr(bias_pos), d);
      }
    } else {  // into the saved patch matrix, the chunk at once
      {
        RECORD_FUNCTION("slvit_cpu::patch_gather", std::vector<c10::IValue>());
        patch_permute_layout(false, cl, xc.data_ptr<float>(), xc.strides().data(), fptr(pm), cc);
      }
      RECORD_FUNCTION("slvit_cpu::fwd_embed", std::vector<c10::IValue>());
      if (c.E == 0) {
        tile_gemm(isa, n, d, c.P, fptr(pm), c.P, 1, fptr(WpT), d, fptr(t), d, false, 1, 0, 0, fptr(add_chunk), d);
      } else {
        for (int64_t b = 0; b < S; ++b)
          tile_gemm(isa, Np, d, c.P, fptr(pm) + b * Np * c.P, c.P, 1, fptr(WpT), d, fptr(t) + b * T * d, d, false, 1,
                    0, 0, fptr(bias_pos), d);
      }
    }
    if (c.E) {  // the extra tokens' embedding
      const float *Wep = fptr(We), *bep = fptr(be), *exp_ = fptr(extraf);
      for (int64_t b = 0; b < S; ++b)
        for (int64_t e = 0; e < c.E; ++e) {
          const float* ex = exp_ + ((b0 + b) * c.E + e) * c.De;
          float* row = fptr(t) + (b * T + Np + e) * d;
          for (int64_t f = 0; f < d; ++f) {
            float acc = bep[f];
            for (int64_t k = 0; k < c.De; ++k) acc += Wep[f * c.De + k] * ex[k];
            row[f] = acc;
          }
        }
    }
    dropout_apply(fptr(t), n * d, b0 * T * d, 0, c.thr_drop, c.seed);
    for (int64_t l = 0; l < c.layers; ++l) {
      const int64_t q = pi + l * kPerLayer;
      const int64_t sk = 1 + l * kSavedPerLayer;
      float *y1 = rows(sk + 3), *mean1 = rows(sk + 1), *rstd1 = rows(sk + 2), *qkv = rows(sk + 4), *P = rows(sk + 5),
            *o = rows(sk + 6), *t1 = rows(sk + 7), *mean2 = rows(sk + 8), *rstd2 = rows(sk + 9), *y2 = rows(sk + 10),
            *hpre = rows(sk + 11), *hact = rows(sk + 12);
      {
        RECORD_FUNCTION("slvit_cpu::fwd_ln1", std::vector<c10::IValue>());
        ln_forward(fptr(t), n, d, fptr(p[q]), fptr(p[q + 1]), eps, fptr(y1), fptr(mean1), fptr(rstd1));
      }
      float* qkvp = save_all ? fptr(qkv) : qbuf;  // not saved: the backward recomputes it from y1
      {
        RECORD_FUNCTION("slvit_cpu::fwd_qkv", std::vector<c10::IValue>());
        tile_gemm(isa, n, A3, d, fptr(y1), d, 1, fptr(lw[l].WqkvT), A3, qkvp, A3, false, 1, 0, 0, fptr(lw[l].bqkv), 0);
      }
      if (mask) {
        const int64_t nm = S * c.heads * T * T;
        std::fill_n(mask, nm, 1.f);
        dropout_apply(mask, nm, b0 * c.heads * T * T, 2 + 3 * l, c.thr_attn, c.seed);
      }
      {
        RECORD_FUNCTION("slvit_cpu::attn_forward", std::vector<c10::IValue>());
        slvit_train::AttnChunk ac;
        ac.isa = isa; ac.S = S; ac.T = T; ac.heads = c.heads; ac.kd = c.kd; ac.A = A; ac.scale = scale;
        ac.qkv = qkvp; ac.P = fptr(P); ac.mask = mask; ac.o = fptr(o); ac.dO = nullptr; ac.dqkv = nullptr;
        ac.scratch = ascr;
        slvit_train::attn_forward_chunk(ac);
      }
      {
        RECORD_FUNCTION("slvit_cpu::fwd_out_proj", std::vector<c10::IValue>());
        tile_gemm(isa, n, d, A, fptr(o), A, 1, fptr(lw[l].WoT), d, fptr(t1), d, false, 1, 0, 0, fptr(t), d);
        const float* bo = fptr(p[q + 9]);
        float* t1p = fptr(t1);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t f = 0; f < d; ++f) t1p[r * d + f] += bo[f];
      }
      {
        RECORD_FUNCTION("slvit_cpu::fwd_ln2", std::vector<c10::IValue>());
        ln_forward(fptr(t1), n, d, fptr(p[q + 10]), fptr(p[q + 11]), eps, fptr(y2), fptr(mean2), fptr(rstd2));
      }
      // fc1 + GELU: into the saved hpre / hact (SAVE_ALL), else with GELU in the epilogue into this
      // worker's buffer (the backward recomputes hpre from the saved y2: a K = d GEMM on L2-resident
      // rows instead of writing and re-reading 2 x n x mlp floats)
      float* hid = save_all ? fptr(hact) : hbuf;
      if (save_all) {
        RECORD_FUNCTION("slvit_cpu::fwd_fc1", std::vector<c10::IValue>());
        tile_gemm(isa, n, mlp, d, fptr(y2), d, 1, fptr(lw[l].W1T), mlp, fptr(hpre), mlp, false, 1, 0, 0,
                  fptr(p[q + 13]), 0);
        slvit_fused::gelu_forward(fptr(hpre), hid, n * mlp);
      } else {
        RECORD_FUNCTION("slvit_cpu::fwd_fc1", std::vector<c10::IValue>());
        tile_gemm(isa, n, mlp, d, fptr(y2), d, 1, fptr(lw[l].W1T), mlp, hid, mlp, false, 1, 0, 0, fptr(p[q + 13]), 0,
                  slvit_fused::kGelu);
      }
      dropout_apply(hid, n * mlp, b0 * T * mlp, 3 + 3 * l, c.thr_drop, c.seed);
      float* t2 = l + 1 < c.layers ? rows(sk + kSavedPerLayer) : rows(nsaved - 3);
      {
        RECORD_FUNCTION("slvit_cpu::fwd_fc2", std::vector<c10::IValue>());
        tile_gemm(isa, n, d, mlp, hid, mlp, 1, fptr(lw[l].W2T), d, fptr(t2), d, false, 1, 0, 0, fptr(p[q + 15]), 0);
      }
      dropout_apply(fptr(t2), n * d, b0 * T * d, 4 + 3 * l, c.thr_drop, c.seed);
      if (c.residual) {
        float* t2p = fptr(t2);
        const float* t1p = fptr(t1);
        for (int64_t k = 0; k < n * d; ++k) t2p[k] += t1p[k];
      }
      t = t2;
    }
  });
  if (!save_all) sink[3].neg_();  // the mark: the first layer's rstd (saved[3]) negated (recompute_marked)
  // head, batch-wide (fixed column blocks: head_mm)
  const Tensor &flat = sink[nsaved - 3], &z = sink[nsaved - 2], &a = sink[nsaved - 1];
  head_mm(z, &p[head0 + 1], flat, p[head0].t(), sch.nw_fwd, sch.dynamic);
  Tensor av = a;
  if (c.act == 0) gelu_into(av, z); else at::relu_out(av, z);
  dropout_apply(fptr(a), c.B * c.hidden, 0, 1, c.thr_head, c.seed);  // saved dropped
  head_mm(out, &p[head0 + 3], a, p[head0 + 2].t(), sch.nw_fwd, sch.dynamic);
}

// The fused backward (exit_backward on AVX2+FMA CPUs): the head for the whole batch, then the workers run
// backward_chunk_fused over the groups of chunks they claim, each group into its own accumulation slot,
// and the slots are summed in group order (Schedule); acc is left with that one sum.
void fused_backward(int isa, const Tensor& g, const Tensor& x, const c10::optional<Tensor>& extra,
                    const std::vector<Tensor>& p, at::TensorList saved, const BwdWeights& bw, const Cfg& c,
                    bool need_dx, Tensor& dx, Tensor& dextra, std::vector<std::vector<Tensor>>& acc) {
  const int64_t layer0 = 3 + (c.E ? 2 : 0);
  // GEMMs on the tiles; encoder/embedding gradients accumulated in place in the group's slot (zeroed)
  Tensor xf = x.to(at::kFloat);
  std::optional<SingleThreadScope> prep_single;  // small weight copies on this thread (train_forward_fused)
  prep_single.emplace(true);
  FusedBwdWeights fw;
  for (int64_t l = 0; l < c.layers; ++l) {
    const int64_t pi = layer0 + l * kPerLayer;
    fw.Wqkv.push_back(slack_copy(bw.Wqkv[l]));
    fw.Wo.push_back(slack_copy(p[pi + 8]));
    fw.W1.push_back(slack_copy(p[pi + 12]));
    fw.W2.push_back(slack_copy(p[pi + 14]));
    fw.W1T.push_back(slack_copy(p[pi + 12].t()));
    fw.WqkvT.push_back(slack_copy(bw.Wqkv[l].t()));
    fw.bqkv.push_back(at::cat({p[pi + 3], p[pi + 5], p[pi + 7]}, 0));
  }
  if (need_dx) fw.Wp = slack_copy(bw.Wp);
  prep_single.reset();  // saved activations can be large: their copies (if any) keep ATen's threads
  // saved activations read as B operands need slack after them (ours have it; a copy made elsewhere may not)
  std::vector<Tensor> sv(saved.begin(), saved.end());
  // the fused forward left patches, Q/K/V and the MLP hidden activations to the backward
  const bool regather_pm = recompute_marked(sv[3]);
  if (regather_pm) sv[3] = sv[3].neg();
  for (auto& t : sv)
    if (!has_slack(t)) t = slack_copy(t.to(at::kFloat));
  const Schedule sch = make_schedule(c);
  const int64_t head0 = (int64_t)p.size() - 4;
  Slots slots(p, head0, sch.groups);  // the encoder/embedding gradients, one slot per group
  acc.assign(1, std::vector<Tensor>(p.size()));
  // the head for the whole batch at once (fixed column blocks: head_mm): per chunk it wrote and summed a
  // full head-weight-sized gradient (1.7 MB at resnet152-b1) for a few samples each time
  Tensor dt_all;
  {
    const auto fopt = at::TensorOptions().dtype(at::kFloat);
    const int64_t nsaved = (int64_t)sv.size(), nw = sch.nw_bwd;
    const Tensor &flat = sv[nsaved - 3], &z = sv[nsaved - 2], &a = sv[nsaved - 1];
    acc[0][head0 + 3] = colsum(g, sch.dynamic);
    acc[0][head0 + 2] = at::empty({c.outputs, c.hidden}, fopt);
    head_mm(acc[0][head0 + 2], nullptr, g.t(), a, nw, sch.dynamic);  // a saved after dropout
    Tensor da = at::empty({c.B, c.hidden}, fopt);
    head_mm(da, nullptr, g, p[head0 + 2], nw, sch.dynamic);
    dropout_apply(da.data_ptr<float>(), c.B * c.hidden, 0, 1, c.thr_head, c.seed);
    Tensor dz = act_bwd(da, z, c.act).contiguous();
    acc[0][head0 + 1] = colsum(dz, sch.dynamic);
    acc[0][head0] = at::empty({c.hidden, c.T * c.d}, fopt);
    head_mm(acc[0][head0], nullptr, dz.t(), flat, nw, sch.dynamic);
    dt_all = at::empty({c.B, c.T * c.d}, fopt);
    head_mm(dt_all, nullptr, dz, p[head0], nw, sch.dynamic);
    dt_all = dt_all.view({c.B * c.T, c.d});
  }
  std::vector<FusedBwdBufs> bufs(sch.nw_bwd);
  const SampleRows sv_rows(sv, c.B);
  backward_chunks(c, sch, slots, [&](int64_t w, int64_t slot, int64_t b0, int64_t n) {
    if (!bufs[w].keep.defined()) bufs[w] = fused_bwd_bufs(c, sch.cs);
    Cfg cc = c;
    cc.B = n;
    std::vector<float*> s(sv.size());
    for (size_t k = 0; k < sv.size(); ++k) s[k] = sv_rows.at(k, b0);
    c10::optional<Tensor> ex;
    if (c.E) ex = extra->narrow(0, b0, n);
    Tensor dxr = need_dx ? dx.narrow(0, b0, n) : Tensor();
    Tensor der = c.E ? dextra.narrow(0, b0, n) : Tensor();
    backward_chunk_fused(isa, dt_all.narrow(0, b0 * c.T, n * c.T), xf.narrow(0, b0, n), ex, p, s.data(), bw, fw, bufs[w], cc, need_dx ? &dxr : nullptr,
                         c.E ? &der : nullptr, slots.acc[slot], b0, regather_pm);
  });
  std::vector<Tensor> sum = slots.sum();
  for (int64_t i = 0; i < head0; ++i) acc[0][i] = std::move(sum[i]);
}
#endif

}  // namespace slvit_cpu
