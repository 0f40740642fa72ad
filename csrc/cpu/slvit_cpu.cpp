// Fused CPU implementation of the SL-ViT exit (forward and backward), registered as torch ops
//   slvit_fast::cpu_exit_forward(x, extra, params, cfg, eps, save) -> Tensor[]  [out, saved...]
//   slvit_fast::cpu_exit_backward(grad_out, x, extra, params, saved, cfg, eps, need_dx) -> Tensor[]
// Fake (meta) implementations and autograd live in Python (slvit_fast/ops/cpp_ops.py); the batch-1
// entry point that skips the op (module_cpu.cpp: _C_cpu.exit_infer) uses entry_* below.
//
// Inference (save=false) on AVX2+FMA CPUs runs the fused kernels of fused_avx2.cpp (fused_forward
// below); training (save=true, returns the activations for the backward) on AVX2+FMA CPUs runs the
// fused training path (train_fused_path.cpp: train_forward_fused / fused_backward on the same GEMM tiles,
// attention in fused_train.cpp, SLVIT_FAST_CPU_TRAIN_FUSED; what the two files share: train_common.h);
// the rest of this file is the ATen/BLAS path: training
// without the fused kernels and the inference fallback (inference_forward: the same building blocks in
// a bounded workspace, large batches in chunks).
//
// Design (see csrc/README.md): one C++ call per forward / backward, so batch 1 pays no per-op
// Python overhead; everything computes in float32 (fp16/bf16 inputs are upcast once, outputs cast
// back). Training runs each pass in ONE parallel region: every worker takes its own samples in
// chunks of ~512 token rows and runs the chunk's ops serially (MKL single-threaded GEMMs over the
// chunk's rows, the saved activations written straight into the batch's tensors), parameter
// gradients are accumulated per worker and reduced once (for_train_chunks, train_forward,
// backward_chunk). On AVX2+FMA CPUs attention forward and backward run one (sample, head) per kernel
// call when SLVIT_FAST_CPU_TRAIN_KERNELS includes "attn" (fused_avx2.cpp: micro-GEMMs, row softmax and
// its backward, dropout mask inside; opt-in, see train_kernel), else per-(sample, head) BLAS sgemm
// calls and ATen's softmax; GELU uses the fused kernels' rational erf on AVX2 CPUs. Dropout (cfg[13..16]: keep thresholds and a seed) uses counter-based masks that
// the backward regenerates (dropout_apply). Patch extraction is a strided gather straight from NCHW
// or channels_last memory.

// Per-operator headers instead of <ATen/ATen.h>: this file compiles in a fraction of the time.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/_softmax_backward_data.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <ATen/Config.h>

#include "blas_dispatch.h"
#include "cpu_entry.h"
#include "train_common.h"
#include "block_pool.h"

#ifdef SLVIT_FUSED_AVX2
#include "fused_avx2.h"
#include "fused_tiles.h"
#include "fused_train.h"
#include "patch_rows.h"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cctype>
#include <memory>
#include <string>
#include <vector>

namespace slvit_cpu {

using at::Tensor;

// Heads per at::parallel_for chunk: only split the (sample, head) loop when each chunk has ~1 MFLOP.
static int64_t head_grain(int64_t T, int64_t kd) {
  const int64_t flops = 2 * T * T * kd;
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(flops, 1));
}

static Cfg make_cfg(const Tensor& x, const c10::optional<Tensor>& extra, at::IntArrayRef cfg) {
  TORCH_CHECK(cfg.size() == kCfgLen || cfg.size() == kCfgLen + 4, "slvit_fast: cfg must have ", kCfgLen,
              " ints (or ", kCfgLen + 4, " with dropout), got ", cfg.size());
  Cfg c;
  if (cfg.size() == kCfgLen + 4) {
    c.thr_drop = cfg[13]; c.thr_attn = cfg[14]; c.thr_head = cfg[15]; c.seed = cfg[16];
    for (int64_t t : {c.thr_drop, c.thr_attn, c.thr_head})
      TORCH_CHECK(t >= 0 && t <= (int64_t(1) << 32), "slvit_fast: dropout threshold ", t,
                  " out of range [0, 2^32] (rate * 2^32)");
  }
  c.ph = cfg[0]; c.pw = cfg[1]; c.d = cfg[2]; c.heads = cfg[3]; c.kd = cfg[4]; c.mlp = cfg[5];
  c.hidden = cfg[6]; c.outputs = cfg[7]; c.E = cfg[8]; c.De = cfg[9]; c.residual = cfg[10] != 0;
  c.act = cfg[11]; c.layers = cfg[12];
  TORCH_CHECK(c.ph > 0 && c.pw > 0 && c.d > 0 && c.heads > 0 && c.kd > 0 && c.mlp > 0 && c.hidden > 0 &&
                  c.outputs > 0 && c.E >= 0 && c.De >= 0 && c.layers >= 1 && (c.act == 0 || c.act == 1),
              "slvit_fast: invalid cfg ", cfg);
  TORCH_CHECK(x.dim() == 4, "slvit_fast: x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "slvit_fast cpu op: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "slvit_fast: x must be floating point, got ", x.scalar_type());
  c.B = x.size(0); c.C = x.size(1); c.H = x.size(2); c.W = x.size(3);
  TORCH_CHECK(c.B > 0, "slvit_fast: empty batch");
  TORCH_CHECK(c.H % c.ph == 0 && c.W % c.pw == 0, "slvit_fast: feature map ", c.H, "x", c.W,
              " not divisible by patch ", c.ph, "x", c.pw);
  c.gh = c.H / c.ph; c.gw = c.W / c.pw; c.Np = c.gh * c.gw; c.T = c.Np + c.E;
  c.P = c.ph * c.pw * c.C; c.A = c.heads * c.kd;
  TORCH_CHECK(c.T > 0 && c.C > 0, "slvit_fast: no tokens or channels: feature map ", c.H, "x", c.W, " with ", c.C,
              " channels and patch ", c.ph, "x", c.pw);
  if (c.E > 0) {
    TORCH_CHECK(extra.has_value() && extra->defined(), "slvit_fast: cfg has extra tokens but extra is None");
    TORCH_CHECK(extra->dim() == 3 && extra->size(0) == c.B && extra->size(1) == c.E && extra->size(2) == c.De,
                "slvit_fast: extra must be (", c.B, ", ", c.E, ", ", c.De, "), got ", extra->sizes());
    TORCH_CHECK(extra->device().is_cpu(), "slvit_fast cpu op: extra must be on CPU");
  } else {
    TORCH_CHECK(!(extra.has_value() && extra->defined()), "slvit_fast: extra given but cfg has no extra tokens");
  }
  return c;
}

static std::vector<Tensor> float_params(at::TensorList params, const Cfg& c) {
  int64_t expected = 3 + (c.E ? 2 : 0) + kPerLayer * c.layers + 4;
  TORCH_CHECK((int64_t)params.size() == expected, "slvit_fast: expected ", expected, " parameters, got ",
              params.size());
  std::vector<Tensor> out;
  out.reserve(params.size());
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu(), "slvit_fast cpu op: parameters must be CPU tensors");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "slvit_fast: parameters must be floating point");
    out.push_back(p.to(at::kFloat).contiguous());
  }
  // shape checks: a wrong shape must be an error here, never an out-of-bounds read in a kernel
  auto chk = [&](int64_t i, std::vector<int64_t> shape, const char* what) {
    TORCH_CHECK(out[i].sizes() == at::IntArrayRef(shape), "slvit_fast: parameter ", what, " has shape ",
                out[i].sizes(), ", expected ", at::IntArrayRef(shape));
  };
  int64_t i = 0;
  chk(i++, {c.d, c.P}, "patch_embed.weight");
  chk(i++, {c.d}, "patch_embed.bias");
  chk(i++, {c.Np, c.d}, "pos_embed");
  if (c.E) {
    chk(i++, {c.d, c.De}, "extra_embed.weight");
    chk(i++, {c.d}, "extra_embed.bias");
  }
  for (int64_t l = 0; l < c.layers; ++l) {
    chk(i++, {c.d}, "norm1.weight"); chk(i++, {c.d}, "norm1.bias");
    for (const char* n : {"attn.q", "attn.k", "attn.v"}) {
      chk(i++, {c.A, c.d}, n); chk(i++, {c.A}, n);
    }
    chk(i++, {c.d, c.A}, "attn.out.weight"); chk(i++, {c.d}, "attn.out.bias");
    chk(i++, {c.d}, "norm2.weight"); chk(i++, {c.d}, "norm2.bias");
    chk(i++, {c.mlp, c.d}, "mlp.fc1.weight"); chk(i++, {c.mlp}, "mlp.fc1.bias");
    chk(i++, {c.d, c.mlp}, "mlp.fc2.weight"); chk(i++, {c.d}, "mlp.fc2.bias");
  }
  chk(i++, {c.hidden, c.T * c.d}, "head.fc1.weight"); chk(i++, {c.hidden}, "head.fc1.bias");
  chk(i++, {c.outputs, c.hidden}, "head.fc2.weight"); chk(i++, {c.outputs}, "head.fc2.bias");
  return out;
}

// The vector kernels of patch_rows.cpp (AVX2) gather / scatter the layouts they support (unit stride
// along the copied run); everything else runs the scalar loops below. SLVIT_FAST_CPU_PATCH_SCALAR=1
// (test / benchmark knob; unset, empty or 0 = off) forces the scalar loops. Returns true when the vector
// kernel did the work.
template <bool kScatter>
static bool patch_rows_vector(float* x, const int64_t* xs, float* pm, const Cfg& c, bool channel_major) {
#ifdef SLVIT_FUSED_AVX2
  static const bool cpu_ok = slvit_fused::cpu_supported();
  if (!cpu_ok) return false;
  const char* env = std::getenv("SLVIT_FAST_CPU_PATCH_SCALAR");
  if (env && *env) {
    TORCH_CHECK(std::strcmp(env, "0") == 0 || std::strcmp(env, "1") == 0,
                "slvit_fast: SLVIT_FAST_CPU_PATCH_SCALAR must be 0 or 1, got '", env, "'");
    if (env[0] == '1') return false;
  }
  const slvit_patch::Geom g{c.C, c.H, c.W, c.ph, c.pw, xs[0], xs[1], xs[2], xs[3]};
  const auto o = channel_major ? slvit_patch::kChannelMajor : slvit_patch::kPixelMajor;
  if (!slvit_patch::rows_vectorized(g, o)) return false;
  at::parallel_for(0, c.B * c.gh, 1, [&](int64_t lo, int64_t hi) {
    if (kScatter) slvit_patch::scatter_rows(pm, g, o, x, lo, hi); else slvit_patch::gather_rows(x, g, o, pm, lo, hi);
  });
  return true;
#else
  return false;
#endif
}

// Patch gather (B,C,H,W) any strides -> (B*Np, P) in (ph, pw, C) order; scatter is its inverse
// (every x element belongs to exactly one patch slot, so the backward is a pure permutation).
template <bool kScatter>
static void patch_permute(float* x, const int64_t* xs, float* pm, const Cfg& c) {
  RECORD_FUNCTION(kScatter ? "slvit_cpu::patch_scatter" : "slvit_cpu::patch_gather", std::vector<c10::IValue>());
  if (patch_rows_vector<kScatter>(x, xs, pm, c, false)) return;
  const int64_t sb = xs[0], sc = xs[1], sh = xs[2], sw = xs[3];
  const bool channels_inner = sc < sw;  // channels_last: walk channels innermost
  at::parallel_for(0, c.B * c.gh, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t b = bg / c.gh, gy = bg % c.gh;
      float* rowbase = pm + (b * c.Np + gy * c.gw) * c.P;
      for (int64_t i = 0; i < c.ph; ++i) {
        const int64_t y = gy * c.ph + i;
        float* xr = x + b * sb + y * sh;
        if (channels_inner) {
          for (int64_t gx = 0; gx < c.gw; ++gx) {
            for (int64_t j = 0; j < c.pw; ++j) {
              float* dst = rowbase + gx * c.P + (i * c.pw + j) * c.C;
              float* src = xr + (gx * c.pw + j) * sw;
              if (sc == 1) {
                if (kScatter) std::copy(dst, dst + c.C, src); else std::copy(src, src + c.C, dst);
              } else {
                for (int64_t ch = 0; ch < c.C; ++ch) {
                  if (kScatter) src[ch * sc] = dst[ch]; else dst[ch] = src[ch * sc];
                }
              }
            }
          }
        } else {
          // NCHW: blocks of channels so each write is a short contiguous run, reads stream along rows
          constexpr int64_t kCB = 16;
          for (int64_t c0 = 0; c0 < c.C; c0 += kCB) {
            const int64_t cn = std::min(kCB, c.C - c0);
            for (int64_t gx = 0; gx < c.gw; ++gx) {
              for (int64_t j = 0; j < c.pw; ++j) {
                float* dst = rowbase + gx * c.P + (i * c.pw + j) * c.C + c0;
                float* src = xr + c0 * sc + (gx * c.pw + j) * sw;
                for (int64_t ch = 0; ch < cn; ++ch) {
                  if (kScatter) src[ch * sc] = dst[ch]; else dst[ch] = src[ch * sc];
                }
              }
            }
          }
        }
      }
    }
  });
}

// NCHW inputs: gather in (C, ph, pw) order instead - every copy is a contiguous run of pw pixels
// along an image row - and permute the (small) patch-embedding weight to match.
template <bool kScatter>
static void patch_permute_cij(float* x, const int64_t* xs, float* pm, const Cfg& c) {
  RECORD_FUNCTION(kScatter ? "slvit_cpu::patch_scatter" : "slvit_cpu::patch_gather", std::vector<c10::IValue>());
  if (patch_rows_vector<kScatter>(x, xs, pm, c, true)) return;
  const int64_t sb = xs[0], sc = xs[1], sh = xs[2], sw = xs[3];
  at::parallel_for(0, c.B * c.gh, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bg = lo; bg < hi; ++bg) {
      const int64_t b = bg / c.gh, gy = bg % c.gh;
      float* rowbase = pm + (b * c.Np + gy * c.gw) * c.P;
      // the ph image rows of channel plane ch + 4 are fetched ahead: planes are H*W*4 bytes apart, a
      // new page per channel the hardware prefetchers do not follow (the gather waited on memory)
      constexpr int64_t kAhead = 4;
      const int64_t row_bytes = c.W * sw * (int64_t)sizeof(float);
      for (int64_t ch = 0; ch < c.C; ++ch) {
        if (!kScatter && ch + kAhead < c.C && row_bytes <= 4096)
          for (int64_t i = 0; i < c.ph; ++i) {
            const char* r = (const char*)(x + b * sb + (ch + kAhead) * sc + (gy * c.ph + i) * sh);
            for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(r + o);
          }
        for (int64_t i = 0; i < c.ph; ++i) {
          float* src = x + b * sb + ch * sc + (gy * c.ph + i) * sh;
          float* dst = rowbase + (ch * c.ph + i) * c.pw;
          if (sw == 1 && c.pw == 4) {  // the paper's 4-pixel patch rows: one 16-byte move each
            for (int64_t gx = 0; gx < c.gw; ++gx) {
              float* d = dst + gx * c.P;
              float* s = src + gx * 4;
              if (kScatter) __builtin_memcpy(s, d, 16); else __builtin_memcpy(d, s, 16);
            }
            continue;
          }
          for (int64_t gx = 0; gx < c.gw; ++gx) {
            float* d = dst + gx * c.P;
            float* s = src + gx * c.pw * sw;
            if (kScatter) {
              for (int64_t j = 0; j < c.pw; ++j) s[j * sw] = d[j];
            } else {
              for (int64_t j = 0; j < c.pw; ++j) d[j] = s[j * sw];
            }
          }
        }
      }
    }
  });
}

static bool channels_inner(const Tensor& x) { return x.stride(1) < x.stride(3); }

// GELU and its backward on contiguous float32 tensors: the AVX2 rational-erf kernels when the CPU
// has them (ATen's erf GELU costs several times more per element), else ATen.
// Which of the training path's AVX2 kernels run: SLVIT_FAST_CPU_TRAIN_KERNELS, a comma list of "gelu",
// "attn"; unset = "gelu". The per-(sample, head) AVX2 attention kernels (attention_forward_head /
// attention_backward_head) are correct (tested with the variable set) but measured ~5-10% slower per
// training step than the per-head MKL sgemm calls + ATen softmax at T = 49 (one thread, one process,
// interleaved), so they are opt-in until they are faster (they spend their time in the local operand
// copies and in 16-column tiles that are mostly padding at T = 49).
static bool train_kernel(const char* name, bool dflt) {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_KERNELS");
  if (!env) return dflt;
  return std::strstr(env, name) != nullptr;
}

static bool avx2_elementwise() {
#ifdef SLVIT_FUSED_AVX2
  static const bool ok = slvit_fused::cpu_supported();
  return ok;
#else
  return false;
#endif
}

void gelu_into(Tensor& out, const Tensor& in) {
  RECORD_FUNCTION("slvit_cpu::gelu", std::vector<c10::IValue>());
#ifdef SLVIT_FUSED_AVX2
  if (avx2_elementwise() && train_kernel("gelu", true) && in.is_contiguous() && out.is_contiguous()) {
    const float* src = in.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, in.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
      slvit_fused::gelu_forward(src + lo, dst + lo, hi - lo);
    });
    return;
  }
#endif
  at::gelu_out(out, in);
}

static Tensor gelu_grad(const Tensor& g, const Tensor& z) {
  RECORD_FUNCTION("slvit_cpu::gelu_backward", std::vector<c10::IValue>());
#ifdef SLVIT_FUSED_AVX2
  if (avx2_elementwise() && train_kernel("gelu", true) && g.is_contiguous() && z.is_contiguous()) {
    Tensor dz = at::empty_like(g);
    const float *gp = g.data_ptr<float>(), *zp = z.data_ptr<float>();
    float* dp = dz.data_ptr<float>();
    at::parallel_for(0, g.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
      slvit_fused::gelu_backward(gp + lo, zp + lo, dp + lo, hi - lo);
    });
    return dz;
  }
#endif
  return at::gelu_backward(g, z);
}

Tensor act_bwd(const Tensor& g, const Tensor& z, int64_t act) {
  return act == 0 ? gelu_grad(g, z) : g.mul(z.gt(0).to(g.scalar_type()));
}

// Per (sample, head): S = scale * Q K^T  (into P, softmaxed afterwards by ATen)
static void attn_scores(const float* qkv, float* S, const Cfg& c, float scale) {
  RECORD_FUNCTION("slvit_cpu::attn_scores", std::vector<c10::IValue>());
  const int64_t T = c.T, A3 = 3 * c.A;
  at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
    SequentialBlas seq;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / c.heads, h = bh % c.heads;
      const float* q = qkv + b * T * A3 + h * c.kd;
      const float* k = q + c.A;
      gemm_rm(false, true, T, T, c.kd, scale, q, A3, k, A3, 0.f, S + bh * T * T, T);
    }
  });
}

// Per (sample, head): O = P V  (O row-major (B*T, A), head h at columns h*kd)
static void attn_pv(const float* P, const float* qkv, float* o, const Cfg& c) {
  RECORD_FUNCTION("slvit_cpu::attn_pv", std::vector<c10::IValue>());
  const int64_t T = c.T, A3 = 3 * c.A;
  at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
    SequentialBlas seq;
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / c.heads, h = bh % c.heads;
      const float* v = qkv + b * T * A3 + 2 * c.A + h * c.kd;
      gemm_rm(false, false, T, c.kd, T, 1.f, P + bh * T * T, T, v, A3, 0.f, o + b * T * c.A + h * c.kd, c.A);
    }
  });
}

// Inference intermediates live in a per-thread arena that is reused across calls: a fresh multi-MB
// buffer per call costs page faults (first touch) that at batch 64 are as expensive as the math.
// The arena is bounded (arena_floats(): 64 MB, SLVIT_FAST_CPU_ARENA_MB): the ATen/BLAS path runs
// larger batches in chunks whose intermediates fit in it (inference_forward), and a request above it
// (one huge sample, or the fused kernels' batch-proportional head buffers at a very large batch)
// gets a buffer of its own that is freed when the call returns. So after any call a thread keeps at
// most the bound - an unbounded arena kept the whole batch's intermediates (5.4 GB after one
// batch-4096 resnet152-b1 call on the ATen/BLAS path).
// Training (save=true) allocates normally: the saved activations are returned to autograd.
static int64_t arena_floats() {
  const char* env = std::getenv("SLVIT_FAST_CPU_ARENA_MB");
  if (!env || !*env) return int64_t(16) << 20;  // 64 MB
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  TORCH_CHECK(end != env && *end == 0 && mb >= 0 && mb < 1e6,
              "slvit_fast: SLVIT_FAST_CPU_ARENA_MB must be a number of megabytes (0 to 1e6), got '", env, "'");
  return (int64_t)(mb * (1 << 18));  // 2^18 floats per MB
}

static float* thread_arena(int64_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t cap = 0;
  if (n > cap) {
    buf.reset();  // free the old buffer before the larger one is allocated (peak = the new size)
    buf.reset(new float[n]);
    cap = n;
  }
  return buf.get();
}

// The workspace of one call: the calling thread's arena, or a temporary above the arena's bound
// (large blocks come from mmap in glibc, so freeing one returns it to the OS).
class Workspace {
  std::unique_ptr<float[]> own_;
  float* ptr_;

 public:
  // bound: arena_floats(), read by the caller (the batch-1 entry reads it with the GIL held, entry_env)
  Workspace(int64_t n, int64_t bound) {
    if (n <= bound) {
      ptr_ = thread_arena(n);
    } else {
      own_.reset(new float[n]);
      ptr_ = own_.get();
    }
  }
  float* get() const { return ptr_; }
};

struct Alloc {
  bool fresh;
  float* base = nullptr;
  int64_t off = 0, cap = 0;
  Tensor operator()(at::IntArrayRef shape) {
    const auto fopt = at::TensorOptions().dtype(at::kFloat);
    if (fresh) return at::empty(shape, fopt);
    int64_t n = 1;
    for (auto v : shape) n *= v;
    TORCH_CHECK(off + n <= cap, "slvit_fast: internal error: workspace too small");
    Tensor t = at::from_blob(base + off, shape, fopt);
    off += (n + 15) / 16 * 16;  // keep 64-byte alignment
    return t;
  }
};

// ----------------------------------------------------------------------------------------------
// Inference through the fused AVX2 kernels (fused_avx2.cpp): one parallel region, workers meet at a
// spin barrier. SLVIT_FAST_CPU_FUSED=0 forces the ATen/BLAS path below (also used on CPUs without
// AVX2/FMA and for training, which needs the saved activations).
// SLVIT_FAST_CPU_FUSED read like slvit_fast/backends/env.py reads on/off switches: 1/true/yes/on or
// 0/false/no/off in any case, unset or empty = on; anything else is an error naming the value (a typo
// must not silently select the other path).
static bool fused_switch() {
  const char* env = std::getenv("SLVIT_FAST_CPU_FUSED");
  std::string v = env ? env : "";
  v.erase(0, v.find_first_not_of(" \t\n"));
  v.erase(v.find_last_not_of(" \t\n") + 1);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return (char)std::tolower(ch); });
  if (v.empty() || v == "1" || v == "true" || v == "yes" || v == "on") return true;
  if (v == "0" || v == "false" || v == "no" || v == "off") return false;
  TORCH_CHECK(false, "slvit_fast: environment variable SLVIT_FAST_CPU_FUSED='", env,
              "' is not an on/off value; use one of 1/true/yes/on or 0/false/no/off, or unset it");
}

#ifdef SLVIT_FUSED_AVX2
// SLVIT_FAST_CPU_ISA: instruction set of the fused kernels' GEMMs. auto (default; unset or empty) takes
// AVX-512 when the CPU and OS support it, else AVX2; avx2 / avx512 force one (any case, blanks
// trimmed, like fused_switch). Anything else, or avx512 without the CPU support, is an error naming the
// value / the missing feature. Read on every call (tests change it). Call after cpu_supported().
static int fused_isa() {
  const char* env = std::getenv("SLVIT_FAST_CPU_ISA");
  std::string v = env ? env : "";
  v.erase(0, v.find_first_not_of(" \t\n"));
  v.erase(v.find_last_not_of(" \t\n") + 1);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return (char)std::tolower(ch); });
  const char* missing = slvit_fused::avx512_missing();
  if (v.empty() || v == "auto") return missing ? slvit_fused::kIsaAvx2 : slvit_fused::kIsaAvx512;
  if (v == "avx2") return slvit_fused::kIsaAvx2;
  TORCH_CHECK(v == "avx512", "slvit_fast: environment variable SLVIT_FAST_CPU_ISA='", env,
              "' is not a valid value; use one of auto/avx2/avx512, or unset it");
  TORCH_CHECK(!missing, "slvit_fast: SLVIT_FAST_CPU_ISA='", env, "' but this CPU (or OS) lacks ", missing,
              "; use auto or avx2");
  return slvit_fused::kIsaAvx512;
}

// SLVIT_FAST_CPU_EMBED (test / measuring knob): "auto" (default) embeds patches straight from the image
// rows where that kernel applies (slvit_fused::Problem::embed_direct), "gather" always gathers patch
// panels first. Anything else is an error naming the value.
bool embed_direct_wanted() {
  const char* env = std::getenv("SLVIT_FAST_CPU_EMBED");
  std::string v = env ? env : "";
  v.erase(0, v.find_first_not_of(" \t\n"));
  v.erase(v.find_last_not_of(" \t\n") + 1);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return (char)std::tolower(ch); });
  if (v.empty() || v == "auto") return true;
  TORCH_CHECK(v == "gather", "slvit_fast: environment variable SLVIT_FAST_CPU_EMBED='", env,
              "' is not a valid value; use auto or gather, or unset it");
  return false;
}

// SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS: exits under this many FLOPs run on the calling thread (run_prepared).
static double parallel_min_flops() {
  const char* min_env = std::getenv("SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS");
  return min_env ? std::atof(min_env) : 2e6;
}

// Every switch of one fused call, read once per call (a bad SLVIT_FAST_CPU_ISA is an error here: the
// batch-1 entry then declines and the op raises it).
FusedEnv entry_env() {
  static const bool supported = slvit_fused::cpu_supported();
  FusedEnv env;
  if (!(fused_switch() && supported)) return env;
  env.fused = true;
  env.isa = fused_isa();
  env.min_flops = parallel_min_flops();
  env.arena_floats = arena_floats();
  env.embed_direct = embed_direct_wanted();
  return env;
}

static bool fused_wanted() { return entry_env().fused; }

// "avx512" / "avx2": the instruction set fused inference uses now; "" when it is off or unsupported.
std::string cpu_fused_isa() {
  if (!fused_wanted()) return "";
  return fused_isa() == slvit_fused::kIsaAvx512 ? "avx512" : "avx2";
}

// Test/benchmark knobs of the fused path (fused_debug, _C_cpu._fused_debug): the old team phase layout
// (for old-vs-new timings in one process) and per-phase cycle counters.
static std::atomic<bool> g_legacy_phases{false};

// The validated weight pointers of one exit for the fused kernels: what float_params + the pointer
// walk produce, kept by the module entry point (entry_cpu.cpp) while the parameters are unchanged.
struct Prepared {
  Cfg c;  // B unset
  double eps;
  slvit_fused::Problem pr;  // weights set; x, extra, out, B unset
  std::vector<slvit_fused::LayerWeights> layers;
  std::vector<Tensor> keep;  // float32 copies made for non-float32 parameters (kept alive)
};

static void prepare(Prepared& pp, const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                    const Cfg& c, double eps) {
  std::vector<Tensor> p = float_params(params, c);
  pp.c = c;
  pp.eps = eps;
  slvit_fused::Problem& pr = pp.pr;
  pr.C = c.C; pr.H = c.H; pr.W = c.W; pr.ph = c.ph; pr.pw = c.pw; pr.gh = c.gh; pr.gw = c.gw;
  pr.Np = c.Np; pr.E = c.E; pr.De = c.De; pr.T = c.T; pr.d = c.d; pr.heads = c.heads; pr.kd = c.kd; pr.A = c.A;
  pr.mlp = c.mlp; pr.hidden = c.hidden; pr.outputs = c.outputs; pr.layers = c.layers;
  pr.residual = c.residual;
  pr.head_act = c.act == 0 ? 1 : 2;
  pr.eps = (float)eps;
  int64_t i = 0;
  pr.Wp = p[i++].data_ptr<float>(); pr.bp = p[i++].data_ptr<float>(); pr.pos = p[i++].data_ptr<float>();
  pr.We = pr.be = nullptr;
  if (c.E) { pr.We = p[i++].data_ptr<float>(); pr.be = p[i++].data_ptr<float>(); }
  pp.layers.resize(c.layers);
  for (auto& L : pp.layers) {
    const float* w[kPerLayer];
    for (int64_t j = 0; j < kPerLayer; ++j) w[j] = p[i++].data_ptr<float>();
    L = {w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8], w[9], w[10], w[11], w[12], w[13], w[14], w[15]};
  }
  pr.layer = pp.layers.data();
  pr.Wh1 = p[i++].data_ptr<float>(); pr.bh1 = p[i++].data_ptr<float>();
  pr.Wh2 = p[i++].data_ptr<float>(); pr.bh2 = p[i++].data_ptr<float>();
  pp.keep.clear();
  for (size_t j = 0; j < p.size(); ++j)
    if (!p[j].is_same(params[j])) pp.keep.push_back(p[j]);
}

// The fused forward for x (shape checked against pp by the caller) with prepared weights.
// Reads no environment variable (env: entry_env), so the batch-1 entry can run it without the GIL.
// A float32 x / output skips the dtype conversions (two op dispatches per call).
static Tensor run_prepared(const Prepared& pp, const Tensor& x, const c10::optional<Tensor>& extra, int64_t B,
                           const FusedEnv& env) {
  RECORD_FUNCTION("slvit_cpu::fused_forward", std::vector<c10::IValue>());
  Cfg c = pp.c;
  c.B = B;
  const bool f32 = x.scalar_type() == at::kFloat;
  Tensor xf = f32 ? x : x.to(at::kFloat);
  Tensor extraf;
  if (c.E) extraf = extra->scalar_type() == at::kFloat && extra->is_contiguous() ? *extra : extra->to(at::kFloat).contiguous();
  slvit_fused::Problem pr = pp.pr;
  pr.B = B;
  pr.layer = pp.layers.data();
  pr.legacy_phases = g_legacy_phases.load(std::memory_order_relaxed);
  pr.isa = env.isa;
  pr.embed_direct = env.embed_direct;
  pr.x = xf.data_ptr<float>();
  pr.sb = xf.stride(0); pr.sc = xf.stride(1); pr.sh = xf.stride(2); pr.sw = xf.stride(3);
  pr.extra = c.E ? extraf.data_ptr<float>() : nullptr;
  Tensor out = at::detail::empty_cpu({c.B, c.outputs}, at::kFloat);  // no dispatch: ~10k cycles less at batch 1
  pr.out = out.data_ptr<float>();

  // Workers must run concurrently (they meet at barriers): only OpenMP's parallel_for promises that.
  // Tiny exits (well under a millisecond of math) run on the calling thread: waking the OpenMP team
  // and a dozen barriers cost more than they save. SLVIT_FAST_CPU_PARALLEL_MIN_FLOPS overrides the
  // threshold (the tests set 0 to run the multi-worker paths on small shapes).
  const double min_flops = env.min_flops;
  const double flops = 2.0 * c.B * c.T *
                       (double(c.P) * c.d + 4.0 * c.d * c.A + 2.0 * c.d * c.mlp + 2.0 * c.T * c.A + c.d * c.hidden);
  int nw = 1;
#if AT_PARALLEL_OPENMP
  if (!at::in_parallel_region() && flops >= min_flops) nw = std::max(1, at::get_num_threads());
#endif
  Workspace wsp(slvit_fused::workspace_floats(pr, nw), env.arena_floats);
  float* ws = wsp.get();
  slvit_fused::Barrier bar;
  bar.total = nw;
  if (nw == 1) {
    slvit_fused::run(pr, ws, 1, 0, 1, &bar);
  } else {
    at::parallel_for(0, nw, 1, [&](int64_t lo, int64_t hi) { slvit_fused::run(pr, ws, nw, (int)lo, (int)hi, &bar); });
  }
  return f32 ? out : out.to(x.scalar_type());
}

static Tensor fused_forward(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                            const Cfg& c, double eps) {
  Prepared pp;
  prepare(pp, x, extra, params, c, eps);
  return run_prepared(pp, x, extra, c.B, entry_env());
}

// Returns the cycle counters (of this thread) collected since profiling was last switched on, one
// per phase (slvit_fused::Phase order), read before the knobs change.
Tensor fused_debug(int64_t legacy_phases, int64_t profile) {
  Tensor out = at::empty({slvit_fused::kNumPhases}, at::TensorOptions().dtype(at::kDouble));
  slvit_fused::read_profile(out.data_ptr<double>());
  if (legacy_phases >= 0) g_legacy_phases.store(legacy_phases != 0);
  if (profile >= 0) slvit_fused::set_profiling(profile != 0);
  return out;
}

std::shared_ptr<Prepared> entry_prepare(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                                        at::IntArrayRef cfg, double eps) {
  Cfg c = make_cfg(x, extra, cfg);
  auto pp = std::make_shared<Prepared>();
  prepare(*pp, x, extra, params, c, eps);
  return pp;
}

bool entry_matches(const Prepared& pp, const Tensor& x, const c10::optional<Tensor>& extra) {
  const Cfg& c = pp.c;
  if (x.dim() != 4 || x.size(0) < 1 || x.size(1) != c.C || x.size(2) != c.H || x.size(3) != c.W) return false;
  const bool has_extra = extra.has_value() && extra->defined();
  if (has_extra != (c.E > 0)) return false;
  if (has_extra && (extra->dim() != 3 || extra->size(0) != x.size(0) || extra->size(1) != c.E || extra->size(2) != c.De))
    return false;
  return true;
}

Tensor entry_run(const Prepared& pp, const Tensor& x, const c10::optional<Tensor>& extra, const FusedEnv& env) {
  return run_prepared(pp, x, extra, x.size(0), env);
}
#else
static bool fused_wanted() { return fused_switch() && false; }  // the switch is still validated
std::string cpu_fused_isa() { return fused_wanted() ? "?" : ""; }
static Tensor fused_forward(const Tensor&, const c10::optional<Tensor>&, at::TensorList, const Cfg&, double) {
  TORCH_CHECK(false, "slvit_fast: this build has no fused AVX2 kernels (not an x86-64 build)");
}
Tensor fused_debug(int64_t, int64_t) {
  TORCH_CHECK(false, "slvit_fast: this build has no fused AVX2 kernels (not an x86-64 build)");
}
struct Prepared {};
FusedEnv entry_env() {
  fused_switch();  // validated
  return FusedEnv{};
}
std::shared_ptr<Prepared> entry_prepare(const Tensor&, const c10::optional<Tensor>&, at::TensorList, at::IntArrayRef,
                                        double) {
  TORCH_CHECK(false, "slvit_fast: this build has no fused AVX2 kernels (not an x86-64 build)");
}
bool entry_matches(const Prepared&, const Tensor&, const c10::optional<Tensor>&) { return false; }
Tensor entry_run(const Prepared&, const Tensor&, const c10::optional<Tensor>&, const FusedEnv&) {
  TORCH_CHECK(false, "slvit_fast: this build has no fused AVX2 kernels (not an x86-64 build)");
}
#endif

// Floats of the ATen/BLAS inference path's intermediates for a batch of B (what Alloc hands out).
static int64_t inference_floats(const Cfg& c, int64_t B) {
  auto r = [](int64_t n) { return (n + 15) / 16 * 16; };
  const int64_t BT = B * c.T;
  const int64_t per_layer = r(BT * c.d) * 4 + r(BT) * 4 + r(BT * 3 * c.A) + 2 * r(B * c.heads * c.T * c.T) +
                            r(BT * c.A) + 2 * r(BT * c.mlp);
  return r(B * c.Np * c.P) + r(B * c.Np * c.d) + r(BT * c.d) + r(B * c.E * c.d) + c.layers * per_layer +
         2 * r(B * c.hidden);
}

// Forward of the ATen/BLAS path for the samples of x. Inference (save=false) takes its
// intermediates from ws (inference_floats(c, c.B) floats); training returns them as saved tensors.
// ---- dropout: counter-based masks ------------------------------------------------------------------
// Element i of dropout site `site` is kept iff hash(seed, site, i) >= thr (thr = rate * 2^32), where i
// is the element's index in the whole batch's tensor, so the mask does not depend on chunking or
// threads, and the backward regenerates exactly the forward's mask. Kept elements are scaled by
// 1 / (1 - rate) (as F.dropout). Sites: 0 embedding output (B, T, d); 1 head hidden (B, hidden); per
// layer l: 2 + 3l attention probabilities (B, h, T, T), 3 + 3l MLP hidden (B*T, mlp), 4 + 3l MLP
// output (B*T, d). hash = lowbias32(i_lo ^ key), key = lowbias32(i_hi ^ lowbias32(seed_lo ^
// lowbias32(seed_hi ^ (site * 0x9E3779B9)))) (lowbias32: C. Wellons' 32-bit integer hash).
static inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

static bool dropout_on(const Cfg& c) { return c.thr_drop > 0 || c.thr_attn > 0 || c.thr_head > 0; }

// data[k] *= keep(idx0 + k) ? scale : 0 for k < n (data contiguous).
void dropout_apply(float* data, int64_t n, int64_t idx0, int64_t site, int64_t thr, uint64_t seed) {
  if (thr <= 0) return;
  const double rate = (double)thr / 4294967296.0;
  const float scale = thr >= (int64_t(1) << 32) ? 0.f : (float)(1.0 / (1.0 - rate));
  const uint32_t base = lowbias32((uint32_t)seed ^ lowbias32((uint32_t)(seed >> 32) ^ (uint32_t)(site * 0x9E3779B9ULL)));
  int64_t k = 0;
  while (k < n) {
    const uint64_t i = (uint64_t)(idx0 + k);
    const uint32_t key = lowbias32((uint32_t)(i >> 32) ^ base);
    // run to the next 2^32 boundary of the index with one key
    const int64_t run = std::min<int64_t>(n - k, (int64_t)((uint64_t(1) << 32) - (i & 0xffffffffULL)));
    const uint32_t lo0 = (uint32_t)i;
    const uint64_t t = (uint64_t)thr;
    for (int64_t j = 0; j < run; ++j) {
      const uint32_t h = lowbias32((lo0 + (uint32_t)j) ^ key);
      data[k + j] *= ((uint64_t)h >= t) ? scale : 0.f;
    }
    k += run;
  }
}

// With `sink` (training in chunks, train_forward): the saved activations of these c.B samples are
// written into rows of the batch's saved tensors (sink, in the order this function returns them),
// starting at sample b0, and the logits into `out_rows`; the return value is then empty.
static std::vector<Tensor> forward_impl(const Tensor& x, const c10::optional<Tensor>& extra,
                                        const std::vector<Tensor>& p, const Cfg& c, double eps, bool save,
                                        float* ws, const std::vector<Tensor>* sink = nullptr, int64_t b0 = 0,
                                        Tensor* out_rows = nullptr) {
  SingleThreadScope single(c.B * c.T < kSingleThreadRows);
  Tensor xf = x.to(at::kFloat);
  std::vector<Tensor> saved;
  const int64_t BT = c.B * c.T;
  Alloc alloc{save};
  if (!save) {
    alloc.cap = inference_floats(c, c.B);
    alloc.base = ws;
  }
  const int64_t nsaved = 1 + kSavedPerLayer * c.layers + 3;
  // saved tensor k for this chunk: rows of sink[k], or a fresh tensor
  auto salloc = [&](int64_t k, at::IntArrayRef shape) -> Tensor {
    if (!sink) return alloc(shape);
    const int64_t per_sample = shape[0] / c.B;  // rows per sample: Np, T or 1
    return (*sink)[k].narrow(0, b0 * per_sample, shape[0]).view(shape);
  };

  // 1. patches + embedding + position (+ extra tokens)
  Tensor pm = salloc(0, {c.B * c.Np, c.P});
  int64_t pi = 0;
  const Tensor &Wp0 = p[pi++], &bp = p[pi++], &pos = p[pi++];
  Tensor Wp = Wp0;
  if (channels_inner(xf)) {
    patch_permute<false>(xf.data_ptr<float>(), xf.strides().data(), pm.data_ptr<float>(), c);
  } else {
    patch_permute_cij<false>(xf.data_ptr<float>(), xf.strides().data(), pm.data_ptr<float>(), c);
    Wp = Wp0.view({c.d, c.ph, c.pw, c.C}).permute({0, 3, 1, 2}).contiguous().view({c.d, c.P});
  }
  Tensor emb = alloc({c.B * c.Np, c.d});
  at::mm_out(emb, pm, Wp.t());
  Tensor t = salloc(1, {BT, c.d});  // the first layer's input (saved)
  {
    Tensor bias_pos = pos.add(bp).contiguous();
    const float* e = emb.data_ptr<float>();
    const float* bpp = bias_pos.data_ptr<float>();
    float* tp = t.data_ptr<float>();
    const int64_t nd = c.Np * c.d;
    at::parallel_for(0, c.B, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const float* eb = e + b * nd;
        float* tb = tp + b * c.T * c.d;
        for (int64_t k = 0; k < nd; ++k) tb[k] = eb[k] + bpp[k];
      }
    });
  }
  if (c.E) {
    const Tensor &We = p[pi++], &be = p[pi++];
    Tensor extraf = extra->to(at::kFloat).contiguous().view({c.B * c.E, c.De});
    Tensor ex = alloc({c.B * c.E, c.d});
    at::addmm_out(ex, be, extraf, We.t());
    t.view({c.B, c.T, c.d}).narrow(1, c.Np, c.E).copy_(ex.view({c.B, c.E, c.d}));
  }
  dropout_apply(t.data_ptr<float>(), BT * c.d, b0 * c.T * c.d, 0, c.thr_drop, c.seed);
  if (save) saved.push_back(pm);

  const float scale = 1.0f / std::sqrt((float)c.kd);
  for (int64_t l = 0; l < c.layers; ++l) {
    const Tensor &g1 = p[pi], &be1 = p[pi + 1];
    Tensor Wqkv = at::cat({p[pi + 2], p[pi + 4], p[pi + 6]}, 0);
    Tensor bqkv = at::cat({p[pi + 3], p[pi + 5], p[pi + 7]}, 0);
    const Tensor &Wo = p[pi + 8], &bo = p[pi + 9], &g2 = p[pi + 10], &be2 = p[pi + 11];
    const Tensor &W1 = p[pi + 12], &b1 = p[pi + 13], &W2 = p[pi + 14], &b2 = p[pi + 15];
    pi += kPerLayer;
    const int64_t sk = 1 + l * kSavedPerLayer;  // this layer's saved tensors: sk .. sk + 12

    Tensor y1 = salloc(sk + 3, {BT, c.d}), mean1 = salloc(sk + 1, {BT, 1}), rstd1 = salloc(sk + 2, {BT, 1});
    at::native_layer_norm_out(y1, mean1, rstd1, t, {c.d}, g1, be1, eps);
    Tensor qkv = salloc(sk + 4, {BT, 3 * c.A});
    at::addmm_out(qkv, bqkv, y1, Wqkv.t());
    Tensor P = salloc(sk + 5, {c.B, c.heads, c.T, c.T});
    Tensor o = salloc(sk + 6, {BT, c.A});
#ifdef SLVIT_FUSED_AVX2
    if (avx2_elementwise() && train_kernel("attn", false)) {
      // AVX2: scores, softmax (P saved) and P V of each (sample, head) in one kernel call
      RECORD_FUNCTION("slvit_cpu::attn_forward", std::vector<c10::IValue>());
      const int64_t T = c.T, A3 = 3 * c.A;
      Tensor mask;
      if (c.thr_attn > 0) {
        mask = at::empty({c.B, c.heads, T, T}, at::TensorOptions().dtype(at::kFloat));
        std::fill_n(mask.data_ptr<float>(), mask.numel(), 1.f);
        dropout_apply(mask.data_ptr<float>(), mask.numel(), b0 * c.heads * T * T, 2 + 3 * l, c.thr_attn, c.seed);
      }
      const float* qp = qkv.data_ptr<float>();
      const float* mp = mask.defined() ? mask.data_ptr<float>() : nullptr;
      float *Pp = P.data_ptr<float>(), *op = o.data_ptr<float>();
      const int64_t nscr = slvit_fused::attention_forward_floats(T, c.kd);
      at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
        std::vector<float> scr(nscr);
        for (int64_t bh = lo; bh < hi; ++bh) {
          const int64_t b = bh / c.heads, h = bh % c.heads;
          const float* q = qp + b * T * A3 + h * c.kd;
          slvit_fused::attention_forward_head(q, q + c.A, q + 2 * c.A, A3, Pp + bh * T * T, mp ? mp + bh * T * T : nullptr,
                                              op + b * T * c.A + h * c.kd, c.A, T, c.kd, scale, scr.data());
        }
      });
    } else
#endif
    {
    Tensor S = alloc({c.B, c.heads, c.T, c.T});
    attn_scores(qkv.data_ptr<float>(), S.data_ptr<float>(), c, scale);
    at::_softmax_out(P, S, -1, false);
    if (c.thr_attn > 0) {  // P V with the dropped probabilities; P itself is saved for the softmax backward
      Tensor Pd = P.clone();
      dropout_apply(Pd.data_ptr<float>(), Pd.numel(), b0 * c.heads * c.T * c.T, 2 + 3 * l, c.thr_attn, c.seed);
      attn_pv(Pd.data_ptr<float>(), qkv.data_ptr<float>(), o.data_ptr<float>(), c);
    } else {
      attn_pv(P.data_ptr<float>(), qkv.data_ptr<float>(), o.data_ptr<float>(), c);
    }
    }
    Tensor t1 = salloc(sk + 7, {BT, c.d});
    at::addmm_out(t1, bo, o, Wo.t());
    t1.add_(t);
    Tensor y2 = salloc(sk + 10, {BT, c.d}), mean2 = salloc(sk + 8, {BT, 1}), rstd2 = salloc(sk + 9, {BT, 1});
    at::native_layer_norm_out(y2, mean2, rstd2, t1, {c.d}, g2, be2, eps);
    Tensor hpre = salloc(sk + 11, {BT, c.mlp});
    at::addmm_out(hpre, b1, y2, W1.t());
    Tensor hact = salloc(sk + 12, {BT, c.mlp});
    gelu_into(hact, hpre);
    dropout_apply(hact.data_ptr<float>(), BT * c.mlp, b0 * c.T * c.mlp, 3 + 3 * l, c.thr_drop, c.seed);  // saved dropped
    // the next layer's (saved) input, or the head's (saved) flat input
    Tensor t2 = !sink ? alloc({BT, c.d})
                : l + 1 < c.layers ? salloc(sk + kSavedPerLayer, {BT, c.d})
                                   : salloc(nsaved - 3, {c.B, c.T * c.d}).view({BT, c.d});
    at::addmm_out(t2, b2, hact, W2.t());
    dropout_apply(t2.data_ptr<float>(), BT * c.d, b0 * c.T * c.d, 4 + 3 * l, c.thr_drop, c.seed);
    if (c.residual) t2.add_(t1);
    if (save) saved.insert(saved.end(), {t, mean1, rstd1, y1, qkv, P, o, t1, mean2, rstd2, y2, hpre, hact});
    t = t2;
  }
  const Tensor &Wh1 = p[pi], &bh1 = p[pi + 1], &Wh2 = p[pi + 2], &bh2 = p[pi + 3];
  Tensor flat = t.view({c.B, c.T * c.d});
  Tensor z = salloc(nsaved - 2, {c.B, c.hidden});
  at::addmm_out(z, bh1, flat, Wh1.t());
  Tensor a = salloc(nsaved - 1, {c.B, c.hidden});
  if (c.act == 0) gelu_into(a, z); else at::relu_out(a, z);
  dropout_apply(a.data_ptr<float>(), c.B * c.hidden, b0 * c.hidden, 1, c.thr_head, c.seed);  // saved dropped
  if (out_rows) {
    at::addmm_out(*out_rows, bh2, a, Wh2.t());
    return {};
  }
  Tensor out = at::addmm(bh2, a, Wh2.t());  // always a fresh tensor: it is returned
  std::vector<Tensor> result;
  result.push_back(out.to(x.scalar_type()));
  if (save) {
    saved.insert(saved.end(), {flat, z, a});
    result.insert(result.end(), saved.begin(), saved.end());
  }
  return result;
}

// ATen/BLAS inference with bounded memory. A batch whose intermediates fit in the arena runs as one
// call with every op parallel inside (as small batches always did). A larger batch is cut into
// chunks that fit in 1/nw of the bound, and each of nw workers of one parallel region runs its
// chunks (round robin) with serial ops in its own slice of one workspace: one parallel region per
// call, not one per op and chunk (each region costs a wake-up and a barrier - milliseconds when the
// cores are shared). Every op is per sample or per token row, so chunks do not change what a
// sample's logits depend on.
static Tensor inference_forward(const Tensor& x, const c10::optional<Tensor>& extra, const std::vector<Tensor>& p,
                                const Cfg& c, double eps) {
  const int64_t bound = arena_floats();
  const int64_t need = inference_floats(c, c.B);
  if (need <= bound || c.B == 1) {
    Workspace ws(need, bound);
    return forward_impl(x, extra, p, c, eps, false, ws.get())[0];
  }
  int64_t nw = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  int64_t chunk = std::max<int64_t>(1, std::min(c.B, bound / nw / std::max<int64_t>(inference_floats(c, 1), 1)));
  while (chunk > 1 && inference_floats(c, chunk) * nw > bound) --chunk;
  const int64_t nchunks = (c.B + chunk - 1) / chunk;
  nw = std::min(nw, nchunks);
  const int64_t slot = inference_floats(c, chunk);
  Workspace ws(nw * slot, bound);
  Tensor out = at::empty({c.B, c.outputs}, x.options());
  auto run_worker = [&](int64_t w) {
    for (int64_t i = w; i < nchunks; i += nw) {
      const int64_t b0 = i * chunk, n = std::min(chunk, c.B - b0);
      Cfg cc = c;
      cc.B = n;
      c10::optional<Tensor> ex;
      if (c.E) ex = extra->narrow(0, b0, n);
      out.narrow(0, b0, n).copy_(forward_impl(x.narrow(0, b0, n), ex, p, cc, eps, false, ws.get() + w * slot)[0]);
    }
  };
  if (nw == 1) {
    run_worker(0);
  } else {
    // the workers run ATen ops: give them the caller's grad / inference mode (OpenMP threads do not
    // inherit it; an inference-mode `out` could not be written otherwise)
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, nw, 1, [&](int64_t lo, int64_t hi) {
      at::ThreadLocalStateGuard tls(caller_state);
      SequentialBlas seq;  // ops inside a parallel region are serial; so must BLAS be
      for (int64_t w = lo; w < hi; ++w) run_worker(w);
    });
  }
  return out;
}

// Workers and chunk size of the training path: every op of a chunk runs serially on its worker, so
// one parallel region covers the whole forward (and one the backward) instead of one region per
// ATen op (~60 per step, each a wake-up and a barrier: milliseconds when the cores are shared).
// Chunks of ~512 token rows keep a chunk's activations near the core (L2) between ops; the fused
// path (train_fused_isa) takes ~256 (its widest chunk buffer, n x mlp, then stays within L2).
// SLVIT_FAST_CPU_TRAIN_CHUNK (tests): samples per chunk, and every thread used even for small problems.
int64_t forced_train_chunk() {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_CHUNK");
  return env && *env ? std::atoll(env) : 0;
}

void train_split(const Cfg& c, int64_t& nw, int64_t& cs, bool fused) {
  const int64_t forced = forced_train_chunk();
  const bool small = c.B * c.T < kSingleThreadRows && forced <= 0;
  nw = (small || at::in_parallel_region()) ? 1 : std::min<int64_t>(at::get_num_threads(), c.B);
  nw = std::max<int64_t>(nw, 1);
  const int64_t rows = fused ? 256 : 512;
  cs = forced > 0 ? forced
                  : std::max<int64_t>(1, std::min<int64_t>((c.B + nw - 1) / nw, rows / std::max<int64_t>(c.T, 1)));
}

static int64_t train_workers(const Cfg& c, bool fused = false) {
  int64_t nw, cs;
  train_split(c, nw, cs, fused);
  return nw;
}

// For the fused training path (train_fused_path.cpp, declared in train_common.h): the patch gather /
// scatter of x's memory layout, and which layout x has.
bool x_channels_inner(const Tensor& x) { return channels_inner(x); }

void patch_permute_layout(bool scatter, bool cl, float* x, const int64_t* xs, float* pm, const Cfg& c) {
  if (cl) {
    if (scatter) patch_permute<true>(x, xs, pm, c); else patch_permute<false>(x, xs, pm, c);
  } else {
    if (scatter) patch_permute_cij<true>(x, xs, pm, c); else patch_permute_cij<false>(x, xs, pm, c);
  }
}

// SLVIT_FAST_CPU_TRAIN_FUSED: the fused training path (fused_train.h: the inference kernels' GEMM tiles,
// attention per chunk) - on by default on AVX2+FMA CPUs; 0/false/no/off forces the ATen/BLAS path
// (also the path of CPUs without AVX2/FMA). Read like SLVIT_FAST_CPU_FUSED (fused_switch): 1/true/yes/on
// or 0/false/no/off in any case, unset or empty = on, anything else an error naming the value. The
// GEMM tiles follow SLVIT_FAST_CPU_ISA (fused_isa). Returns the tiles' ISA, or -1 for the ATen path.
static int train_fused_isa() {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_FUSED");
  std::string v = env ? env : "";
  v.erase(0, v.find_first_not_of(" \t\n"));
  v.erase(v.find_last_not_of(" \t\n") + 1);
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return (char)std::tolower(ch); });
  bool on;
  if (v.empty() || v == "1" || v == "true" || v == "yes" || v == "on") {
    on = true;
  } else {
    TORCH_CHECK(v == "0" || v == "false" || v == "no" || v == "off", "slvit_fast: environment variable "
                "SLVIT_FAST_CPU_TRAIN_FUSED='", env, "' is not an on/off value; use one of 1/true/yes/on or "
                "0/false/no/off, or unset it");
    on = false;
  }
#ifdef SLVIT_FUSED_AVX2
  if (on && avx2_elementwise()) return fused_isa();
#endif
  return -1;
}

// Training forward: the saved activations are allocated for the batch once and each chunk's forward
// writes its rows of them (forward_impl with a sink).
static std::vector<Tensor> train_forward(const Tensor& x, const c10::optional<Tensor>& extra,
                                         const std::vector<Tensor>& p, const Cfg& c, double eps, int isa) {
  const bool fused = isa >= 0;
  // SLVIT_FAST_CPU_TRAIN_SAVE_ALL=1 (benchmark/test knob): the fused forward saves the patches, Q/K/V and
  // the MLP hidden activations as the ATen path does, instead of leaving them to the backward
  const char* spe = std::getenv("SLVIT_FAST_CPU_TRAIN_SAVE_ALL");
  const bool save_all = !fused || (spe && *spe && std::strcmp(spe, "0") != 0);
  RECORD_FUNCTION("slvit_cpu::train_forward", std::vector<c10::IValue>());
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const int64_t BT = c.B * c.T;
  std::vector<Tensor> sink;
  auto salloc = fused ? pooled_slack : empty_slack;
  auto unsaved = save_all ? salloc : zero_mapped;  // left to the backward (zero_mapped: never written)
  sink.push_back(unsaved({c.B * c.Np, c.P}));
  for (int64_t l = 0; l < c.layers; ++l) {
    int64_t k = 0;
    for (auto shape : std::vector<std::vector<int64_t>>{
             {BT, c.d}, {BT, 1}, {BT, 1}, {BT, c.d}, {BT, 3 * c.A}, {c.B, c.heads, c.T, c.T}, {BT, c.A}, {BT, c.d},
             {BT, 1}, {BT, 1}, {BT, c.d}, {BT, c.mlp}, {BT, c.mlp}}) {
      sink.push_back(k == 4 || k == 11 || k == 12 ? unsaved(shape) : salloc(shape));
      ++k;
    }
  }
  sink.push_back(at::empty({c.B, c.T * c.d}, fopt));
  sink.push_back(at::empty({c.B, c.hidden}, fopt));
  sink.push_back(at::empty({c.B, c.hidden}, fopt));
  Tensor out = at::empty({c.B, c.outputs}, fopt);
#ifdef SLVIT_FUSED_AVX2
  if (fused) {
    train_forward_fused(isa, x, extra, p, c, eps, sink, out, save_all);
  } else
#endif
  for_train_chunks(c, [&](int64_t, int64_t b0, int64_t n) {
    Cfg cc = c;
    cc.B = n;
    c10::optional<Tensor> ex;
    if (c.E) ex = extra->narrow(0, b0, n);
    Tensor rows = out.narrow(0, b0, n);
    forward_impl(x.narrow(0, b0, n), ex, p, cc, eps, true, nullptr, &sink, b0, &rows);
  });
  std::vector<Tensor> result;
  result.reserve(1 + sink.size());
  result.push_back(out.to(x.scalar_type()));
  result.insert(result.end(), sink.begin(), sink.end());
  return result;
}

std::vector<Tensor> exit_forward(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                                 at::IntArrayRef cfg, double eps, bool save) {
  Cfg c = make_cfg(x, extra, cfg);
  const bool drop = dropout_on(c);
  if (!save && !drop && fused_wanted()) return {fused_forward(x, extra, params, c, eps)};
  std::vector<Tensor> p = float_params(params, c);
  if (!save && !drop) return {inference_forward(x, extra, p, c, eps)};
  std::vector<Tensor> r = train_forward(x, extra, p, c, eps, train_fused_isa());
  if (!save) r.resize(1);
  return r;
}

// Gradient accumulation per worker: the first contribution is kept (owned, contiguous), later ones added.
void acc_add(std::vector<Tensor>& acc, int64_t i, const Tensor& g) {
  if (!acc[i].defined())
    // (a tensor that does not own its whole storage - a slice - is copied: outputs must not alias; is_view()
    // is not reliable inside an op, where views get no autograd metadata)
    acc[i] = (g.storage_offset() != 0 || !g.is_contiguous() ||
              g.storage().nbytes() != (size_t)g.numel() * g.element_size())
                 ? g.clone(at::MemoryFormat::Contiguous)
                 : g;
  else
    acc[i].add_(g);
}

// Backward of the samples of one chunk (c.B of them): s are the chunk's rows of the saved tensors,
// parameter gradients are added to acc (this worker's), dx / dextra rows written when defined.
static void backward_chunk(const Tensor& g, const c10::optional<Tensor>& extra, const std::vector<Tensor>& p,
                           const std::vector<Tensor>& saved, const BwdWeights& bw, const Cfg& c, double eps,
                           Tensor* dx_rows, Tensor* dextra_rows, std::vector<Tensor>& acc, int64_t b0) {
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  const int64_t nsaved = (int64_t)saved.size();
  const int64_t head0 = (int64_t)p.size() - 4;
  const Tensor &Wh1 = p[head0], &Wh2 = p[head0 + 2];
  const Tensor &flat = saved[nsaved - 3], &z = saved[nsaved - 2], &a = saved[nsaved - 1];
  acc_add(acc, head0 + 3, g.sum(0));
  acc_add(acc, head0 + 2, at::mm(g.t(), a));  // a saved after dropout
  Tensor da = at::mm(g, Wh2);
  dropout_apply(da.data_ptr<float>(), c.B * c.hidden, b0 * c.hidden, 1, c.thr_head, c.seed);
  Tensor dz = act_bwd(da, z, c.act);
  acc_add(acc, head0 + 1, dz.sum(0));
  acc_add(acc, head0, at::mm(dz.t(), flat));
  Tensor dt = at::mm(dz, Wh1).view({c.B * c.T, c.d});

  const float scale = 1.0f / std::sqrt((float)c.kd);
  const int64_t layer0 = 3 + (c.E ? 2 : 0);
  for (int64_t l = c.layers - 1; l >= 0; --l) {
    const int64_t pi = layer0 + l * kPerLayer;
    const Tensor* s = &saved[1 + l * kSavedPerLayer];
    const Tensor &t_in = s[0], &mean1 = s[1], &rstd1 = s[2], &y1 = s[3], &qkv = s[4], &P = s[5], &o = s[6],
                 &t1 = s[7], &mean2 = s[8], &rstd2 = s[9], &y2 = s[10], &hpre = s[11], &hact = s[12];
    const Tensor &g1 = p[pi], &be1 = p[pi + 1], &Wo = p[pi + 8], &g2 = p[pi + 10], &be2 = p[pi + 11];
    const Tensor &W1 = p[pi + 12], &W2 = p[pi + 14];
    const Tensor& Wqkv = bw.Wqkv[l];

    // MLP block (dm: gradient of the fc2 output before its dropout; the residual path is not dropped)
    Tensor dm = dt;
    if (c.thr_drop > 0) {
      dm = dt.clone();
      dropout_apply(dm.data_ptr<float>(), dm.numel(), b0 * c.T * c.d, 4 + 3 * l, c.thr_drop, c.seed);
    }
    acc_add(acc, pi + 15, dm.sum(0));
    acc_add(acc, pi + 14, at::mm(dm.t(), hact));
    Tensor dhd = at::mm(dm, W2);
    dropout_apply(dhd.data_ptr<float>(), dhd.numel(), b0 * c.T * c.mlp, 3 + 3 * l, c.thr_drop, c.seed);
    Tensor dh = gelu_grad(dhd, hpre);
    acc_add(acc, pi + 13, dh.sum(0));
    acc_add(acc, pi + 12, at::mm(dh.t(), y2));
    Tensor dy2 = at::mm(dh, W1);
    auto l2 = at::native_layer_norm_backward(dy2, t1, {c.d}, mean2, rstd2, g2, be2, {true, true, true});
    acc_add(acc, pi + 10, std::get<1>(l2));
    acc_add(acc, pi + 11, std::get<2>(l2));
    Tensor dt1 = std::get<0>(l2);
    if (c.residual) dt1.add_(dt);

    // attention block
    acc_add(acc, pi + 9, dt1.sum(0));
    acc_add(acc, pi + 8, at::mm(dt1.t(), o));
    Tensor dO = at::mm(dt1, Wo);  // (B*T, A)
    Tensor dqkv = at::empty({c.B * c.T, 3 * c.A}, fopt);
#ifdef SLVIT_FUSED_AVX2
    if (avx2_elementwise() && train_kernel("attn", false)) {
      // AVX2: each (sample, head) in one kernel call (dV, dP, softmax backward, dQ, dK; no T x T
      // tensors besides the saved P), instead of four BLAS calls and an ATen softmax backward
      RECORD_FUNCTION("slvit_cpu::attn_backward", std::vector<c10::IValue>());
      const int64_t T = c.T, A3 = 3 * c.A;
      Tensor mask;
      if (c.thr_attn > 0) {
        mask = at::empty({c.B, c.heads, T, T}, fopt);
        std::fill_n(mask.data_ptr<float>(), mask.numel(), 1.f);
        dropout_apply(mask.data_ptr<float>(), mask.numel(), b0 * c.heads * T * T, 2 + 3 * l, c.thr_attn, c.seed);
      }
      const float *Pp = P.data_ptr<float>(), *qp = qkv.data_ptr<float>(), *dOp = dO.data_ptr<float>();
      const float* mp = mask.defined() ? mask.data_ptr<float>() : nullptr;
      float* dqp = dqkv.data_ptr<float>();
      const int64_t nscr = slvit_fused::attention_backward_floats(T, c.kd);
      at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
        std::vector<float> scr(nscr);
        for (int64_t bh = lo; bh < hi; ++bh) {
          const int64_t b = bh / c.heads, h = bh % c.heads;
          const float* q = qp + b * T * A3 + h * c.kd;
          float* dq = dqp + b * T * A3 + h * c.kd;
          slvit_fused::attention_backward_head(q, q + c.A, q + 2 * c.A, A3, Pp + bh * T * T,
                                               mp ? mp + bh * T * T : nullptr, dOp + b * T * c.A + h * c.kd, c.A,
                                               dq, dq + c.A, dq + 2 * c.A, A3, T, c.kd, scale, scr.data());
        }
      });
    } else
#endif
    {
      Tensor dP = at::empty({c.B, c.heads, c.T, c.T}, fopt);
      RECORD_FUNCTION("slvit_cpu::attn_backward", std::vector<c10::IValue>());
      const int64_t T = c.T, A3 = 3 * c.A;
      Tensor Pd = P;  // the probabilities P V used (after dropout)
      if (c.thr_attn > 0) {
        Pd = P.clone();
        dropout_apply(Pd.data_ptr<float>(), Pd.numel(), b0 * c.heads * T * T, 2 + 3 * l, c.thr_attn, c.seed);
      }
      const float *Pp = Pd.data_ptr<float>(), *qp = qkv.data_ptr<float>(), *dOp = dO.data_ptr<float>();
      float *dqp = dqkv.data_ptr<float>(), *dPp = dP.data_ptr<float>();
      at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
        SequentialBlas seq;
        for (int64_t bh = lo; bh < hi; ++bh) {
          const int64_t b = bh / c.heads, h = bh % c.heads;
          const float* v = qp + b * T * A3 + 2 * c.A + h * c.kd;
          const float* dOb = dOp + b * T * c.A + h * c.kd;
          // dV = P^T dO ; dP = dO V^T
          gemm_rm(true, false, T, c.kd, T, 1.f, Pp + bh * T * T, T, dOb, c.A, 0.f,
                  dqp + b * T * A3 + 2 * c.A + h * c.kd, A3);
          gemm_rm(false, true, T, T, c.kd, 1.f, dOb, c.A, v, A3, 0.f, dPp + bh * T * T, T);
        }
      });
      dropout_apply(dPp, dP.numel(), b0 * c.heads * T * T, 2 + 3 * l, c.thr_attn, c.seed);
      Tensor dS = at::_softmax_backward_data(dP, P, -1, at::kFloat);
      const float* dSp = dS.data_ptr<float>();
      at::parallel_for(0, c.B * c.heads, head_grain(T, c.kd), [&](int64_t lo, int64_t hi) {
        SequentialBlas seq;
        for (int64_t bh = lo; bh < hi; ++bh) {
          const int64_t b = bh / c.heads, h = bh % c.heads;
          const float* q = qp + b * T * A3 + h * c.kd;
          const float* k = q + c.A;
          // dQ = scale dS K ; dK = scale dS^T Q
          gemm_rm(false, false, T, c.kd, T, scale, dSp + bh * T * T, T, k, A3, 0.f, dqp + b * T * A3 + h * c.kd, A3);
          gemm_rm(true, false, T, c.kd, T, scale, dSp + bh * T * T, T, q, A3, 0.f,
                  dqp + b * T * A3 + c.A + h * c.kd, A3);
        }
      });
    }
    Tensor dWqkv = at::mm(dqkv.t(), y1);
    Tensor dbqkv = dqkv.sum(0);
    for (int j = 0; j < 3; ++j) {
      acc_add(acc, pi + 2 + 2 * j, dWqkv.narrow(0, j * c.A, c.A));
      acc_add(acc, pi + 3 + 2 * j, dbqkv.narrow(0, j * c.A, c.A));
    }
    Tensor dy1 = at::mm(dqkv, Wqkv);
    auto l1 = at::native_layer_norm_backward(dy1, t_in, {c.d}, mean1, rstd1, g1, be1, {true, true, true});
    acc_add(acc, pi, std::get<1>(l1));
    acc_add(acc, pi + 1, std::get<2>(l1));
    dt = std::get<0>(l1).add_(dt1);
  }

  // embedding (dt: gradient of the embedding's output after its dropout)
  dropout_apply(dt.data_ptr<float>(), c.B * c.T * c.d, b0 * c.T * c.d, 0, c.thr_drop, c.seed);
  Tensor dt3 = dt.view({c.B, c.T, c.d});
  Tensor dtp = dt3.narrow(1, 0, c.Np).contiguous().view({c.B * c.Np, c.d});
  const Tensor& pm = saved[0];
  acc_add(acc, 2, dtp.view({c.B, c.Np, c.d}).sum(0));
  acc_add(acc, 1, dtp.sum(0));
  acc_add(acc, 0, at::mm(dtp.t(), pm));  // in pm's column order; permuted once after the reduction
  if (dx_rows) {
    Tensor dpm = at::mm(dtp, bw.Wp);
    if (bw.cl)
      patch_permute<true>(dx_rows->data_ptr<float>(), dx_rows->strides().data(), dpm.data_ptr<float>(), c);
    else
      patch_permute_cij<true>(dx_rows->data_ptr<float>(), dx_rows->strides().data(), dpm.data_ptr<float>(), c);
  }
  if (c.E) {
    Tensor dte = dt3.narrow(1, c.Np, c.E).contiguous().view({c.B * c.E, c.d});
    Tensor extraf = extra->to(at::kFloat).contiguous().view({c.B * c.E, c.De});
    acc_add(acc, 3, at::mm(dte.t(), extraf));
    acc_add(acc, 4, dte.sum(0));
    dextra_rows->copy_(at::mm(dte, p[3]).view({c.B, c.E, c.De}));
  }
}

std::vector<Tensor> exit_backward(const Tensor& grad_out, const Tensor& x, const c10::optional<Tensor>& extra,
                                  at::TensorList params, at::TensorList saved, at::IntArrayRef cfg, double eps,
                                  bool need_dx) {
  RECORD_FUNCTION("slvit_cpu::train_backward", std::vector<c10::IValue>());
  Cfg c = make_cfg(x, extra, cfg);
  std::vector<Tensor> p = float_params(params, c);
  const int64_t nsaved = 1 + kSavedPerLayer * c.layers + 3;
  TORCH_CHECK((int64_t)saved.size() == nsaved, "slvit_fast: backward needs ", nsaved,
              " saved tensors (was the forward run with save=True?), got ", saved.size());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == c.B && grad_out.size(1) == c.outputs,
              "slvit_fast: grad_out must be (", c.B, ", ", c.outputs, "), got ", grad_out.sizes());
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  Tensor g = grad_out.to(at::kFloat).contiguous();

  BwdWeights bw;
  const int64_t layer0 = 3 + (c.E ? 2 : 0);
  for (int64_t l = 0; l < c.layers; ++l) {
    const int64_t pi = layer0 + l * kPerLayer;
    bw.Wqkv.push_back(at::cat({p[pi + 2], p[pi + 4], p[pi + 6]}, 0));
  }
  bw.cl = channels_inner(x);
  bw.Wp = bw.cl ? p[0] : p[0].view({c.d, c.ph, c.pw, c.C}).permute({0, 3, 1, 2}).contiguous().view({c.d, c.P});
  Tensor dx = need_dx ? pooled_grad_like(x) : Tensor();  // block_pool.h: no fresh pages every step
  Tensor dextra = c.E ? at::empty({c.B, c.E, c.De}, fopt) : Tensor();

  std::vector<std::vector<Tensor>> acc;
  const int isa = train_fused_isa();
#ifdef SLVIT_FUSED_AVX2
  if (isa >= 0) {
    fused_backward(isa, g, x, extra, p, saved, bw, c, need_dx, dx, dextra, acc);
  } else
#endif
  {
  std::vector<Tensor> sv(saved.begin(), saved.end());
  if (recompute_marked(sv[3])) {  // saved by the fused forward: gather the patches, recompute Q/K/V, MLP hidden
    sv[3] = sv[3].neg();
    for (int64_t l = 0; l < c.layers; ++l) {
      const int64_t pi = layer0 + l * kPerLayer, k = 1 + l * kSavedPerLayer;
      sv[k + 4] = at::addmm(at::cat({p[pi + 3], p[pi + 5], p[pi + 7]}, 0), sv[k + 3], bw.Wqkv[l].t());
      sv[k + 11] = at::addmm(p[pi + 13], sv[k + 10], p[pi + 12].t());
      sv[k + 12] = at::empty_like(sv[k + 11]);
      gelu_into(sv[k + 12], sv[k + 11]);
      dropout_apply(sv[k + 12].data_ptr<float>(), sv[k + 12].numel(), 0, 3 + 3 * l, c.thr_drop, c.seed);
    }
    Tensor xf = x.to(at::kFloat);
    sv[0] = at::empty({c.B * c.Np, c.P}, fopt);
    if (bw.cl)
      patch_permute<false>(xf.data_ptr<float>(), xf.strides().data(), sv[0].data_ptr<float>(), c);
    else
      patch_permute_cij<false>(xf.data_ptr<float>(), xf.strides().data(), sv[0].data_ptr<float>(), c);
  }
  acc.assign(train_workers(c), std::vector<Tensor>(p.size()));
  for_train_chunks(c, [&](int64_t w, int64_t b0, int64_t n) {
    Cfg cc = c;
    cc.B = n;
    std::vector<Tensor> s;
    s.reserve(saved.size());
    for (const Tensor& t : sv) {
      const int64_t per_sample = t.size(0) / c.B;
      s.push_back(t.narrow(0, b0 * per_sample, n * per_sample));
    }
    c10::optional<Tensor> ex;
    if (c.E) ex = extra->narrow(0, b0, n);
    Tensor dxr = need_dx ? dx.narrow(0, b0, n) : Tensor();
    Tensor der = c.E ? dextra.narrow(0, b0, n) : Tensor();
    backward_chunk(g.narrow(0, b0, n), ex, p, s, bw, cc, eps, need_dx ? &dxr : nullptr, c.E ? &der : nullptr, acc[w],
                   b0);
  });
  }
  // one reduction of the workers' parameter gradients
  std::vector<Tensor> dp(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    for (auto& a : acc) {
      if (!a[i].defined()) continue;
      if (!dp[i].defined()) dp[i] = a[i]; else dp[i].add_(a[i]);
    }
  }
  if (!bw.cl) dp[0] = dp[0].view({c.d, c.C, c.ph, c.pw}).permute({0, 2, 3, 1}).contiguous().view({c.d, c.P});

  std::vector<Tensor> result;
  result.reserve(2 + dp.size());
  result.push_back(need_dx ? dx.to(x.scalar_type()) : at::empty({0}, x.options()));
  result.push_back(c.E ? dextra.to(extra->scalar_type()) : at::empty({0}, x.options()));
  for (size_t i = 0; i < dp.size(); ++i) result.push_back(dp[i].to(params[i].scalar_type()).contiguous());
  return result;
}

}  // namespace slvit_cpu

TORCH_LIBRARY_FRAGMENT(slvit_fast, m) {
  m.def("cpu_exit_forward(Tensor x, Tensor? extra, Tensor[] params, int[] cfg, float eps, bool save) -> Tensor[]");
  m.def("cpu_exit_backward(Tensor grad_out, Tensor x, Tensor? extra, Tensor[] params, Tensor[] saved, int[] cfg, "
        "float eps, bool need_dx) -> Tensor[]");
  // which instruction set fused inference uses now ("" = fused path off / unsupported); raises on a bad
  // SLVIT_FAST_CPU_FUSED / SLVIT_FAST_CPU_ISA value
  m.def("cpu_fused_isa() -> str", &slvit_cpu::cpu_fused_isa);
}

TORCH_LIBRARY_IMPL(slvit_fast, CPU, m) {
  m.impl("cpu_exit_forward", &slvit_cpu::exit_forward);
  m.impl("cpu_exit_backward", &slvit_cpu::exit_backward);
}
