// Torch glue shared by the CUDA extension (cuda_ops.cpp) and the emulation build (emu_ops.cpp):
// checks the op arguments and turns tensors into slvit::ExitArgs for launch_exit_forward, and runs
// the backward (run_backward: BackwardArgs, gradient buffers, outputs in op order).
#pragma once

#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers: much faster to compile
#endif
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include <string>
#include <vector>

#include "slvit_kernels.cuh"

namespace slvit_glue {

using at::Tensor;

inline slvit::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return slvit::DType::F32;
    case at::kHalf: return slvit::DType::F16;
    case at::kBFloat16: return slvit::DType::BF16;
    default: TORCH_CHECK(false, "slvit_fast CUDA kernels support float32, float16 and bfloat16, got ", t);
  }
  return slvit::DType::F32;
}

// Builds the kernel arguments; `keep` receives contiguous copies that must outlive the launch.
inline slvit::ExitArgs make_args(const Tensor& x, const c10::optional<Tensor>& extra, at::TensorList params,
                                 at::IntArrayRef cfg, double eps, std::vector<Tensor>& keep, const char* who) {
  TORCH_CHECK(cfg.size() == 13, who, ": cfg must have 13 ints, got ", cfg.size());
  TORCH_CHECK(x.dim() == 4, who, ": x must be (B, C, H, W), got shape ", x.sizes());
  slvit::ExitArgs a{};
  a.dtype = to_dtype(x.scalar_type());
  a.ph = cfg[0]; a.pw = cfg[1]; a.d = cfg[2]; a.heads = cfg[3]; a.kd = cfg[4]; a.M = cfg[5]; a.Hh = cfg[6];
  a.O = cfg[7]; a.E = cfg[8]; a.De = cfg[9]; a.residual = cfg[10] != 0; a.act = cfg[11]; a.L = cfg[12];
  TORCH_CHECK(a.ph > 0 && a.pw > 0 && a.d > 0 && a.heads > 0 && a.kd > 0 && a.M > 0 && a.Hh > 0 && a.O > 0 &&
                  a.E >= 0 && a.De >= 0 && (a.act == 0 || a.act == 1),
              who, ": invalid cfg ", cfg);
  TORCH_CHECK(a.L >= 1 && a.L <= slvit::kMaxLayers, who, ": num_layers must be 1..", slvit::kMaxLayers, ", got ", a.L);
  a.B = x.size(0); a.C = x.size(1); a.H = x.size(2); a.W = x.size(3);
  TORCH_CHECK(a.B > 0, who, ": empty batch");
  TORCH_CHECK(a.H % a.ph == 0 && a.W % a.pw == 0, who, ": feature map ", a.H, "x", a.W, " not divisible by patch ",
              a.ph, "x", a.pw);
  a.gh = a.H / a.ph; a.gw = a.W / a.pw; a.Np = a.gh * a.gw; a.T = a.Np + a.E; a.A = a.heads * a.kd;
  a.eps = (float)eps;
  // float32 GEMM stages on TF32 tensor cores exactly when torch would let cuBLAS use TF32
  // (torch.get_float32_matmul_precision() != "highest"); fp16/bf16 always use tensor cores
  a.tf32 = x.scalar_type() == at::kFloat &&
           at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  a.scale = 1.0f / std::sqrt((float)a.kd);
  a.x = x.data_ptr();
  a.sx_b = x.stride(0); a.sx_c = x.stride(1); a.sx_h = x.stride(2); a.sx_w = x.stride(3);
  const int64_t P = (int64_t)a.ph * a.pw * a.C;
  const int64_t expected = 3 + (a.E ? 2 : 0) + 16 * a.L + 4;
  TORCH_CHECK((int64_t)params.size() == expected, who, ": expected ", expected, " parameters, got ", params.size());
  size_t i = 0;
  auto take = [&](std::vector<int64_t> shape, const char* what) -> const void* {
    const Tensor& p = params[i++];
    TORCH_CHECK(p.device() == x.device(), who, ": parameter ", what, " is on ", p.device(), ", x on ", x.device());
    TORCH_CHECK(p.scalar_type() == x.scalar_type(), who, ": parameter ", what, " is ", p.scalar_type(),
                " but x is ", x.scalar_type());
    TORCH_CHECK(p.sizes() == at::IntArrayRef(shape), who, ": parameter ", what, " has shape ", p.sizes(),
                ", expected ", at::IntArrayRef(shape));
    keep.push_back(p.contiguous());
    return keep.back().data_ptr();
  };
  a.wp = take({a.d, P}, "patch_embed.weight");
  a.bp = take({a.d}, "patch_embed.bias");
  a.pos = take({a.Np, a.d}, "pos_embed");
  if (a.E) {
    TORCH_CHECK(extra.has_value() && extra->defined(), who, ": cfg has extra tokens but extra is None");
    TORCH_CHECK(extra->dim() == 3 && extra->size(0) == a.B && extra->size(1) == a.E && extra->size(2) == a.De, who,
                ": extra must be (", a.B, ", ", a.E, ", ", a.De, "), got ", extra->sizes());
    TORCH_CHECK(extra->scalar_type() == x.scalar_type() && extra->device() == x.device(), who,
                ": extra must match x's dtype and device");
    keep.push_back(extra->contiguous());
    a.extra = keep.back().data_ptr();
    a.we = take({a.d, a.De}, "extra_embed.weight");
    a.be = take({a.d}, "extra_embed.bias");
  } else {
    TORCH_CHECK(!(extra.has_value() && extra->defined()), who, ": extra given but cfg has no extra tokens");
  }
  for (int l = 0; l < a.L; ++l) {
    slvit::LayerPtrs& lp = a.layers[l];
    lp.g1 = take({a.d}, "norm1.weight"); lp.b1 = take({a.d}, "norm1.bias");
    lp.wq = take({a.A, a.d}, "attn.q.weight"); lp.bq = take({a.A}, "attn.q.bias");
    lp.wk = take({a.A, a.d}, "attn.k.weight"); lp.bk = take({a.A}, "attn.k.bias");
    lp.wv = take({a.A, a.d}, "attn.v.weight"); lp.bv = take({a.A}, "attn.v.bias");
    lp.wo = take({a.d, a.A}, "attn.out.weight"); lp.bo = take({a.d}, "attn.out.bias");
    lp.g2 = take({a.d}, "norm2.weight"); lp.b2 = take({a.d}, "norm2.bias");
    lp.w1 = take({a.M, a.d}, "mlp.fc1.weight"); lp.b1m = take({a.M}, "mlp.fc1.bias");
    lp.w2 = take({a.d, a.M}, "mlp.fc2.weight"); lp.b2m = take({a.d}, "mlp.fc2.bias");
  }
  a.wh1 = take({a.Hh, (int64_t)a.T * a.d}, "head.fc1.weight"); a.bh1 = take({a.Hh}, "head.fc1.bias");
  a.wh2 = take({a.O, a.Hh}, "head.fc2.weight"); a.bh2 = take({a.O}, "head.fc2.bias");
  const char* err = slvit::check_exit_args(a);
  TORCH_CHECK(err == nullptr, who, ": ", err ? err : "");
  return a;
}

// Backward: fills BackwardArgs (grads as one zeroed float32 buffer, dx / dextra allocated here) and
// returns [dx (empty if !need_dx), dextra (empty if no extra), *dparams] after `launch` ran.
template <class Launch, class MakeBuffer>
std::vector<Tensor> run_backward(const Tensor& grad_out, const Tensor& x, const c10::optional<Tensor>& extra,
                                 at::TensorList params, at::IntArrayRef cfg, double eps, bool need_dx,
                                 const char* who, MakeBuffer make_buffer, Launch launch) {
  std::vector<Tensor> keep;
  slvit::BackwardArgs ba{};
  ba.f = make_args(x, extra, params, cfg, eps, keep, who);
  const slvit::ExitArgs& a = ba.f;
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == a.B && grad_out.size(1) == a.O, who,
              ": grad_out must be (", a.B, ", ", a.O, "), got ", grad_out.sizes());
  Tensor g = grad_out.to(x.scalar_type()).contiguous();
  ba.gout = g.data_ptr();
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    ba.goff[i] = total;
    total += (params[i].numel() + 15) / 16 * 16;
  }
  // per-block partial gradients (no atomics), summed once by the reduction kernel into grads
  // SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS (optional) caps the blocks further: tuning, and tests of blocks
  // that handle several samples each.
  int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(a.B, slvit::kPartialBudgetFloats / total));
  if (const char* cap = std::getenv("SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS")) {
    char* end = nullptr;
    const long long v = std::strtoll(cap, &end, 10);
    TORCH_CHECK(end != cap && *end == '\0' && v >= 1, who,
                ": SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS must be a positive integer, got '", cap, "'");
    blocks = std::min<int64_t>(blocks, v);
  }
  Tensor partials = at::zeros({blocks * total}, x.options().dtype(at::kFloat));
  Tensor grads = make_buffer(total);
  ba.grads = grads.data_ptr<float>();
  ba.partials = partials.data_ptr<float>();
  ba.ptotal = total;
  ba.blocks = (int)blocks;
  const int64_t per = slvit::backward_workspace_floats_per_sample(a.T, a.d, a.A, a.M, a.heads, a.Hh, a.L);
  Tensor ws = make_buffer(blocks * per);
  ba.f.ws = ws.data_ptr<float>();
  ba.f.ws_stride = per;
  Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  ba.need_dx = need_dx;
  if (need_dx) {
    ba.dx = dx.data_ptr();
    ba.sdx_b = dx.stride(0); ba.sdx_c = dx.stride(1); ba.sdx_h = dx.stride(2); ba.sdx_w = dx.stride(3);
  }
  Tensor dextra = a.E ? at::empty({a.B, a.E, a.De}, x.options()) : at::empty({0}, x.options());
  if (a.E) ba.dextra = dextra.data_ptr();
  const char* err = launch(ba);
  TORCH_CHECK(err == nullptr, who, ": ", err ? err : "");
  std::vector<Tensor> out{dx, dextra};
  for (size_t i = 0; i < params.size(); ++i)
    out.push_back(grads.narrow(0, ba.goff[i], params[i].numel()).view(params[i].sizes()).to(params[i].scalar_type(),
                                                                                              false, /*copy=*/true));
  return out;
}

}  // namespace slvit_glue
