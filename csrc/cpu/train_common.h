// What the two files of the CPU training ops share: slvit_cpu.cpp (the ops, make_cfg, the ATen/BLAS
// path, dropout masks, patch permutations) and train_fused_path.cpp (the fused training path on the
// GEMM tiles, and the saved activations' allocation). Internal to csrc/cpu/; every definition lives in
// one of the two .cpp files (named below) unless it is a type, a constant or a template.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>

#include "blas_dispatch.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace slvit_cpu {

using at::Tensor;

static constexpr int64_t kSingleThreadRows = 256;  // B*T token rows below which one thread is faster

// ----------------------------------------------------------------------------------------------
struct Cfg {
  int64_t ph, pw, d, heads, kd, mlp, hidden, outputs, E, De;
  bool residual;
  int64_t act;  // 0 gelu, 1 relu
  int64_t layers;
  // dropout (training; cfg[13..16] when present): keep thresholds as fractions of 2^32 and the seed
  int64_t thr_drop = 0, thr_attn = 0, thr_head = 0, seed = 0;
  // derived
  int64_t B, C, H, W, gh, gw, Np, T, P, A;
};

static constexpr int64_t kCfgLen = 13;
static constexpr int64_t kPerLayer = 16;  // params per encoder layer
static constexpr int64_t kSavedPerLayer = 13;

// ---- slvit_cpu.cpp ---------------------------------------------------------------------------------
// Counter-based dropout of element idx0 + k, k < n, of dropout site `site` (see the definition).
void dropout_apply(float* data, int64_t n, int64_t idx0, int64_t site, int64_t thr, uint64_t seed);
// GELU into out (contiguous float32), and the head activation's backward (act: 0 gelu, 1 relu).
void gelu_into(Tensor& out, const Tensor& in);
Tensor act_bwd(const Tensor& g, const Tensor& z, int64_t act);
// Per-worker gradient accumulation: acc[i] = g (owned) the first time, acc[i] += g afterwards.
void acc_add(std::vector<Tensor>& acc, int64_t i, const Tensor& g);
// x's layout (channels innermost: patches in (ph, pw, C) order, else (C, ph, pw)), and the patch gather
// (scatter = false: x -> pm) or its inverse (scatter = true: pm -> x) of that layout.
bool x_channels_inner(const Tensor& x);
// SLVIT_FAST_CPU_EMBED: false when it asks for the gathered patch panels ("gather"); an invalid value
// throws, naming it.
bool embed_direct_wanted();
void patch_permute_layout(bool scatter, bool cl, float* x, const int64_t* xs, float* pm, const Cfg& c);

// Weights the backward of every chunk uses, built once per call.
struct BwdWeights {
  std::vector<Tensor> Wqkv;  // per layer: cat(Wq, Wk, Wv)
  Tensor Wp;                 // patch-embedding weight in the gather's column order
  bool cl;                   // x channels-innermost: pm in (ph, pw, C) order, else (C, ph, pw)
};

// Workers and chunk size of the training path (see the definition), and the samples per chunk forced by
// SLVIT_FAST_CPU_TRAIN_CHUNK (tests; 0 when unset).
void train_split(const Cfg& c, int64_t& nw, int64_t& cs, bool fused = false);
int64_t forced_train_chunk();

// Runs f(w, b0, n) for the chunks of worker w's samples, all workers in one parallel region (with the
// caller's grad/inference mode; BLAS single-threaded inside).
template <class F>
static void for_train_chunks(const Cfg& c, F f, bool fused = false) {
  int64_t nw, cs;
  train_split(c, nw, cs, fused);
  auto worker = [&](int64_t w) {
    const int64_t lo = c.B * w / nw, hi = c.B * (w + 1) / nw;
    for (int64_t b0 = lo; b0 < hi; b0 += cs) f(w, b0, std::min(cs, hi - b0));
  };
  if (nw == 1) {
    SingleThreadScope single(true);
    worker(0);
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nw, 1, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard tls(caller_state);
    SequentialBlas seq;
    for (int64_t w = lo; w < hi; ++w) worker(w);
  });
}

// ---- train_fused_path.cpp: saved activations -------------------------------------------------------
// Floats of readable slack after a B operand of the AVX2 tiles (see empty_slack).
static constexpr int64_t kSlack = 16;
// A float32 tensor of `shape` followed by kSlack readable floats; the same from the saved pool (fused
// path); a never-written zero mapping (what the fused forward leaves to the backward); and whether a
// saved set carries the fused forward's recompute mark (in the first layer's rstd).
Tensor empty_slack(at::IntArrayRef shape);
Tensor pooled_slack(at::IntArrayRef shape);
Tensor zero_mapped(at::IntArrayRef shape);
bool recompute_marked(const Tensor& rstd1);

#ifdef SLVIT_FUSED_AVX2
// ---- train_fused_path.cpp: the fused training path (on AVX2+FMA CPUs, tiles of `isa`) --------------
// Forward: fills the saved tensors `sink` (allocated by the caller, train_forward) and the logits `out`.
void train_forward_fused(int isa, const Tensor& x, const c10::optional<Tensor>& extra, const std::vector<Tensor>& p,
                         const Cfg& c, double eps, std::vector<Tensor>& sink, Tensor& out, bool save_all);
// Backward: writes dx (when need_dx) and dextra (when c.E) and leaves the parameter gradients in acc,
// one vector per accumulator (summed in acc order by the caller, exit_backward).
void fused_backward(int isa, const Tensor& g, const Tensor& x, const c10::optional<Tensor>& extra,
                    const std::vector<Tensor>& p, at::TensorList saved, const BwdWeights& bw, const Cfg& c,
                    bool need_dx, Tensor& dx, Tensor& dextra, std::vector<std::vector<Tensor>>& acc);
#endif

}  // namespace slvit_cpu
