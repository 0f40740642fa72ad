// SL-ViT exit backward: one CUDA kernel (a block per group of samples; num_layers 1..kMaxLayers) + one
// gradient reduction kernel.
//
// The block recomputes its sample's forward into the float32 workspace (the forward kernels keep
// nothing), keeping only each layer's input tokens (a checkpoint per layer) and the internals of the
// last layer, then back-propagates: head -> for each layer from the last: (recompute the layer's
// internals from its checkpoint unless they are already there) MLP block -> LN2 -> attention block ->
// LN1 -> patch / extra embedding. Activation gradients stay in the block's workspace. Parameter gradients
// without atomics: a block handles samples blockIdx.x, blockIdx.x + gridDim.x, ..., reduces each
// gradient over its samples' tokens and adds it to its own float32 partial slot (every element of a
// slot has one owning thread per loop, so plain adds are race-free); slvit_grad_reduce_kernel then sums
// the slots once, in a fixed order (deterministic gradients). dx is written directly (each
// feature-map element belongs to exactly one patch slot).
// Compiled by nvcc, or as host C++ under csrc/emu/simt_emu.h (SLVIT_EMULATE).

#include "slvit_device.cuh"

namespace slvit {

// Adds to the block's own partial-gradient slot (no other block writes it; see the header comment).
__device__ __forceinline__ void acc_add(float* p, float v) { *p += v; }

__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

// LayerNorm backward: dx (+)= LN'(dy) for each row (a warp per row); then gamma / beta gradients.
template <class S>
__device__ void ln_bwd(const float* x, const float* stats, const float* dy, float* dx_acc, const S* g, float* dg,
                       float* db, int rows, int d) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int r = warp; r < rows; r += nwarps) {
    const float mean = stats[2 * r], rstd = stats[2 * r + 1];
    const float* xr = x + (int64_t)r * d;
    const float* dyr = dy + (int64_t)r * d;
    float s1 = 0.f, s2 = 0.f;
    for (int k = lane; k < d; k += 32) {
      const float dyg = dyr[k] * ld(g + k);
      s1 += dyg;
      s2 += dyg * (xr[k] - mean) * rstd;
    }
    s1 = warp_sum(s1) / d;
    s2 = warp_sum(s2) / d;
    for (int k = lane; k < d; k += 32) {
      const float xhat = (xr[k] - mean) * rstd;
      dx_acc[(int64_t)r * d + k] += rstd * (dyr[k] * ld(g + k) - s1 - xhat * s2);
    }
  }
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float sg = 0.f, sb = 0.f;
    for (int r = 0; r < rows; ++r) {
      const float xhat = (x[(int64_t)r * d + e] - stats[2 * r]) * stats[2 * r + 1];
      sg += dy[(int64_t)r * d + e] * xhat;
      sb += dy[(int64_t)r * d + e];
    }
    acc_add(dg + e, sg);
    acc_add(db + e, sb);
  }
}

template <class S>
__global__ void __launch_bounds__(kThreads, 1) slvit_backward_kernel(BackwardArgs ba) {
  const ExitArgs& a = ba.f;
  for (int b = blockIdx.x; b < a.B; b += gridDim.x) {  // this block's samples
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid % 32, warp = tid / 32, nwarps = nthreads / 32;
  const int T = a.T, d = a.d, A = a.A, A3 = 3 * a.A, M = a.M, H = a.heads, kd = a.kd, Hh = a.Hh;
  const int Td = T * d;
  const bool tc = tensor_cores<S>(a);  // the recompute uses the forward's GEMMs (tensor cores included)
  // workspace (layout: backward_workspace_floats_per_sample)
  float* w = a.ws + (int64_t)blockIdx.x * a.ws_stride;  // one workspace per block
  float* tins = w; w += (int64_t)(a.L + 1) * Td;  // layer l's input tokens at tins + l*Td; final tokens last
  float* y1 = w; w += Td;
  float* st1 = w; w += 2 * T;
  float* qkv = w; w += (int64_t)T * A3;
  float* P = w; w += (int64_t)H * T * T;
  float* o = w; w += (int64_t)T * A;
  float* t1 = w; w += Td;
  float* y2 = w; w += Td;
  float* st2 = w; w += 2 * T;
  float* hpre = w; w += (int64_t)T * M;
  float* z = w; w += Hh;
  float* za = w; w += Hh;
  float* dz = w; w += Hh;
  float* dt = w; w += Td;
  float* dy = w; w += Td;
  float* dh = w; w += (int64_t)T * M;
  float* dO = w; w += (int64_t)T * A;
  float* dS = w; w += (int64_t)H * T * T;
  float* dqkv = w;
  float* const t2 = tins + (int64_t)a.L * Td;  // the encoder's output (the head's input)
  // gradient accumulators, in op parameter order
  const int base = 3 + (a.E ? 2 : 0);
  float* G = ba.partials + (int64_t)blockIdx.x * ba.ptotal;  // this block's partial slot
  auto g = [&](int i) { return G + ba.goff[i]; };
  const int P_dim = a.ph * a.pw * a.C;
  const S* x = static_cast<const S*>(a.x) + (int64_t)b * a.sx_b;
  const S* ex = a.E ? static_cast<const S*>(a.extra) + (int64_t)b * a.E * a.De : nullptr;

  // ================= forward recompute (the forward kernels' own stages, slvit_device.cuh) =========
  // One encoder layer's forward from its input tokens tin to tout, keeping what its backward needs (LN
  // stats, Q/K/V, probabilities P, attention output, t1, y2, MLP pre-activation) in the layer buffers.
  // Called from one place (inlined once: the kernel's registers stay those of a single layer).
  auto layer_forward = [&](const LayerPtrs& lp, const float* tin, float* tout) {
    layer_norm_rows(tin, y1, static_cast<const S*>(lp.g1), static_cast<const S*>(lp.b1), T, d, a.eps, st1);
    __syncthreads();
    qkv_projection<S>(lp, y1, qkv, T, d, A, tc);
    __syncthreads();
    if (tc)  // keeps the probabilities P for the backward
      attention_tc<S>(qkv, o, P, true, T, A, H, kd, a.scale);
    else
      attention_rows(qkv, o, P, true, T, A, H, kd, a.scale);
    __syncthreads();
    out_projection<S>(lp, o, tin, t1, T, d, A, tc);
    __syncthreads();
    layer_norm_rows(t1, y2, static_cast<const S*>(lp.g2), static_cast<const S*>(lp.b2), T, d, a.eps, st2);
    __syncthreads();
    mlp_fc1<S>(lp, y2, hpre, T, d, M, Identity(), tc);  // pre-activation: GELU's derivative needs it
    __syncthreads();
    mlp_fc2<S>(lp, hpre, t1, tout, T, d, M, a.residual, Gelu(), tc);
    __syncthreads();
  };
  embed_tokens<S>(a, b, tins);
  __syncthreads();
  // Steps i = 0 .. 2L-2 visit layers 0, 1, .., L-1, L-2, .., 0: step i runs layer l's forward from its
  // checkpoint (the first L steps are the initial pass; later ones recompute the layer whose backward
  // follows), and from step L-1 on the backward of layer l, after the head's at step L-1.
  for (int i = 0; i < 2 * a.L - 1; ++i) {
  const int l = i < a.L ? i : 2 * a.L - 2 - i;
  const LayerPtrs& lp = a.layers[l];
  const float* tin = tins + (int64_t)l * Td;
  layer_forward(lp, tin, tins + (int64_t)(l + 1) * Td);
  if (i < a.L - 1) continue;
  if (i == a.L - 1) {
  head_hidden<S>(a, t2, Td, 1, za, tc, z);
  __syncthreads();

  // ================= backward =================
  const S* wh1 = static_cast<const S*>(a.wh1);
  const S* wh2 = static_cast<const S*>(a.wh2);
  const S* go = static_cast<const S*>(ba.gout) + (int64_t)b * a.O;
  const int ih = base + 16 * a.L;  // head parameters
  // head fc2: dWh2[o, j] += g[o] a[j]; dbh2[o] += g[o]; dz[j] = act'(z_j) sum_o g[o] Wh2[o, j]
  for (int idx = tid; idx < a.O * Hh; idx += nthreads) {
    const int oi = idx / Hh, j = idx % Hh;
    acc_add(g(ih + 2) + idx, ld(go + oi) * za[j]);
  }
  for (int oi = tid; oi < a.O; oi += nthreads) acc_add(g(ih + 3) + oi, ld(go + oi));
  for (int j = tid; j < Hh; j += nthreads) {
    float acc = 0.f;
    for (int oi = 0; oi < a.O; ++oi) acc += ld(go + oi) * ld(wh2 + (int64_t)oi * Hh + j);
    const float der = a.act == 0 ? gelu_grad(z[j]) : (z[j] > 0.f ? 1.f : 0.f);
    dz[j] = acc * der;
    acc_add(g(ih + 1) + j, dz[j]);
  }
  __syncthreads();
  // head fc1: dWh1[j, k] += dz[j] flat[k]; dflat[k] = sum_j dz[j] Wh1[j, k]
  for (int idx = tid; idx < Hh * Td; idx += nthreads) acc_add(g(ih) + idx, dz[idx / Td] * t2[idx % Td]);
  for (int k = tid; k < Td; k += nthreads) {
    float acc = 0.f;
    for (int j = 0; j < Hh; ++j) acc += dz[j] * ld(wh1 + (int64_t)j * Td + k);
    dt[k] = acc;
  }
  __syncthreads();
  }  // head
  // dt: gradient w.r.t. layer l's output tokens; after layer l's backward, w.r.t. its input
  // MLP fc2: dh = gelu'(hpre) * (dt W2); dW2[e, m] += sum_t dt[t, e] gelu(hpre[t, m]); db2m[e] += sum_t dt
  const int il = base + 16 * l;  // layer parameters
  {
    const S* w2 = static_cast<const S*>(lp.w2);
    for (int idx = tid; idx < T * M; idx += nthreads) {
      const int t = idx / M, m = idx % M;
      float acc = 0.f;
      for (int e = 0; e < d; ++e) acc += dt[t * d + e] * ld(w2 + (int64_t)e * M + m);
      dh[idx] = acc * gelu_grad(hpre[idx]);
    }
    for (int idx = tid; idx < d * M; idx += nthreads) {
      const int e = idx / M, m = idx % M;
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dt[t * d + e] * gelu(hpre[(int64_t)t * M + m]);
      acc_add(g(il + 14) + idx, acc);
    }
    for (int e = tid; e < d; e += nthreads) {
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dt[t * d + e];
      acc_add(g(il + 15) + e, acc);
    }
  }
  __syncthreads();
  // MLP fc1: dy2 = dh W1; dW1[m, e] += sum_t dh[t, m] y2[t, e]; db1m[m] += sum_t dh[t, m]
  {
    const S* w1 = static_cast<const S*>(lp.w1);
    for (int idx = tid; idx < Td; idx += nthreads) {
      const int t = idx / d, e = idx % d;
      float acc = 0.f;
      for (int m = 0; m < M; ++m) acc += dh[(int64_t)t * M + m] * ld(w1 + (int64_t)m * d + e);
      dy[idx] = acc;
    }
    for (int idx = tid; idx < M * d; idx += nthreads) {
      const int m = idx / d, e = idx % d;
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dh[(int64_t)t * M + m] * y2[t * d + e];
      acc_add(g(il + 12) + idx, acc);
    }
    for (int m = tid; m < M; m += nthreads) {
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dh[(int64_t)t * M + m];
      acc_add(g(il + 13) + m, acc);
    }
  }
  if (!a.residual) {  // without the MLP residual, t1 receives gradient only through LN2
    __syncthreads();
    for (int idx = tid; idx < Td; idx += nthreads) dt[idx] = 0.f;
  }
  __syncthreads();
  // LN2: dt1 = dt (residual) + LN2'(dy2)
  ln_bwd(t1, st2, dy, dt, static_cast<const S*>(lp.g2), g(il + 10), g(il + 11), T, d);
  __syncthreads();
  // out projection: dO = dt1 Wo; dWo[e, c] += sum_t dt1[t, e] o[t, c]; dbo[e] += sum_t dt1
  {
    const S* wo = static_cast<const S*>(lp.wo);
    for (int idx = tid; idx < T * A; idx += nthreads) {
      const int t = idx / A, c = idx % A;
      float acc = 0.f;
      for (int e = 0; e < d; ++e) acc += dt[t * d + e] * ld(wo + (int64_t)e * A + c);
      dO[idx] = acc;
    }
    for (int idx = tid; idx < d * A; idx += nthreads) {
      const int e = idx / A, c = idx % A;
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dt[t * d + e] * o[(int64_t)t * A + c];
      acc_add(g(il + 8) + idx, acc);
    }
    for (int e = tid; e < d; e += nthreads) {
      float acc = 0.f;
      for (int t = 0; t < T; ++t) acc += dt[t * d + e];
      acc_add(g(il + 9) + e, acc);
    }
  }
  __syncthreads();
  // softmax backward, a warp per (head, query row): dS = P * (dP - sum_j P dP), dP = dO V^T
  for (int row = warp; row < H * T; row += nwarps) {
    const int h = row / T, i = row % T;
    const float* prow = P + (int64_t)row * T;
    float* srow = dS + (int64_t)row * T;
    const float* dOi = dO + (int64_t)i * A + h * kd;
    float dot = 0.f;
    for (int j = lane; j < T; j += 32) {
      const float* v = qkv + (int64_t)j * A3 + 2 * A + h * kd;
      float dp = 0.f;
      for (int c = 0; c < kd; ++c) dp += dOi[c] * v[c];
      srow[j] = dp;
      dot += dp * prow[j];
    }
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) srow[j] = prow[j] * (srow[j] - dot);
  }
  __syncthreads();
  // dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO
  for (int idx = tid; idx < T * A3; idx += nthreads) {
    const int t = idx / A3, col = idx % A3, which = col / A, r = col % A, h = r / kd;
    float acc = 0.f;
    if (which == 0) {
      const float* srow = dS + ((int64_t)h * T + t) * T;
      for (int j = 0; j < T; ++j) acc += srow[j] * qkv[(int64_t)j * A3 + A + r];
      acc *= a.scale;
    } else if (which == 1) {
      for (int i = 0; i < T; ++i) acc += dS[((int64_t)h * T + i) * T + t] * qkv[(int64_t)i * A3 + r];
      acc *= a.scale;
    } else {
      for (int i = 0; i < T; ++i) acc += P[((int64_t)h * T + i) * T + t] * dO[(int64_t)i * A + r];
    }
    dqkv[idx] = acc;
  }
  __syncthreads();
  // Q/K/V projections: dy1 = sum dqkv W; dW[r, e] += sum_t dqkv[t, r] y1[t, e]; db[r] += sum_t dqkv
  for (int idx = tid; idx < Td; idx += nthreads) {
    const int t = idx / d, e = idx % d;
    float acc = 0.f;
    for (int col = 0; col < A3; ++col) {
      const int which = col / A, r = col % A;
      const S* wq = static_cast<const S*>(which == 0 ? lp.wq : which == 1 ? lp.wk : lp.wv);
      acc += dqkv[(int64_t)t * A3 + col] * ld(wq + (int64_t)r * d + e);
    }
    dy[idx] = acc;
  }
  for (int idx = tid; idx < A3 * d; idx += nthreads) {
    const int col = idx / d, e = idx % d, which = col / A, r = col % A;
    float acc = 0.f;
    for (int t = 0; t < T; ++t) acc += dqkv[(int64_t)t * A3 + col] * y1[t * d + e];
    acc_add(g(il + 2 + 2 * which) + (int64_t)r * d + e, acc);
  }
  for (int col = tid; col < A3; col += nthreads) {
    const int which = col / A, r = col % A;
    float acc = 0.f;
    for (int t = 0; t < T; ++t) acc += dqkv[(int64_t)t * A3 + col];
    acc_add(g(il + 3 + 2 * which) + r, acc);
  }
  __syncthreads();
  // LN1: dtin = dt1 + LN1'(dy1)
  ln_bwd(tin, st1, dy, dt, static_cast<const S*>(lp.g1), g(il), g(il + 1), T, d);
  __syncthreads();
  }  // steps
  // embedding: dpos[n, e] += dt; dbp[e] += sum_n dt; dWp[e, k] += sum_n dt[n, e] patch[n, k]
  for (int idx = tid; idx < a.Np * d; idx += nthreads) acc_add(g(2) + idx, dt[idx]);
  for (int e = tid; e < d; e += nthreads) {
    float acc = 0.f;
    for (int n = 0; n < a.Np; ++n) acc += dt[n * d + e];
    acc_add(g(1) + e, acc);
  }
  for (int idx = tid; idx < d * P_dim; idx += nthreads) {
    const int e = idx / P_dim, k = idx % P_dim;
    const int i = k / (a.pw * a.C), j = (k / a.C) % a.pw, c = k % a.C;
    float acc = 0.f;
    for (int n = 0; n < a.Np; ++n) {
      const int gy = n / a.gw, gx = n % a.gw;
      acc += dt[n * d + e] *
             ld(x + (int64_t)c * a.sx_c + (int64_t)(gy * a.ph + i) * a.sx_h + (int64_t)(gx * a.pw + j) * a.sx_w);
    }
    acc_add(g(0) + idx, acc);
  }
  if (ba.need_dx) {
    S* dx = static_cast<S*>(ba.dx) + (int64_t)b * ba.sdx_b;
    const S* wp = static_cast<const S*>(a.wp);
    for (int idx = tid; idx < a.C * a.H * a.W; idx += nthreads) {
      const int c = idx / (a.H * a.W), yy = (idx / a.W) % a.H, xx = idx % a.W;
      const int n = (yy / a.ph) * a.gw + xx / a.pw, k = ((yy % a.ph) * a.pw + xx % a.pw) * a.C + c;
      float acc = 0.f;
      for (int e = 0; e < d; ++e) acc += dt[n * d + e] * ld(wp + (int64_t)e * P_dim + k);
      st(dx + (int64_t)c * ba.sdx_c + (int64_t)yy * ba.sdx_h + (int64_t)xx * ba.sdx_w, acc);
    }
  }
  if (a.E > 0) {
    const S* we = static_cast<const S*>(a.we);
    S* dex = static_cast<S*>(ba.dextra) + (int64_t)b * a.E * a.De;
    for (int idx = tid; idx < a.E * a.De; idx += nthreads) {
      const int k = idx / a.De, c = idx % a.De;
      float acc = 0.f;
      for (int e = 0; e < d; ++e) acc += dt[(a.Np + k) * d + e] * ld(we + (int64_t)e * a.De + c);
      st(dex + idx, acc);
    }
    for (int idx = tid; idx < d * a.De; idx += nthreads) {
      const int e = idx / a.De, c = idx % a.De;
      float acc = 0.f;
      for (int k = 0; k < a.E; ++k) acc += dt[(a.Np + k) * d + e] * ld(ex + k * a.De + c);
      acc_add(g(3) + idx, acc);
    }
    for (int e = tid; e < d; e += nthreads) {
      float acc = 0.f;
      for (int k = 0; k < a.E; ++k) acc += dt[(a.Np + k) * d + e];
      acc_add(g(4) + e, acc);
    }
  }
  __syncthreads();  // the workspace is the next sample's
  }  // samples
}

// grads[i] = sum over blocks of partials[blk * ptotal + i] (fixed order: deterministic).
__global__ void __launch_bounds__(kThreads) slvit_grad_reduce_kernel(const float* partials, int64_t ptotal,
                                                                     int nblocks, float* grads) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < ptotal; i += (int64_t)gridDim.x * blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < nblocks; ++k) acc += partials[(int64_t)k * ptotal + i];
    grads[i] = acc;
  }
}

const char* launch_exit_backward(const BackwardArgs& ba, void* stream) {
  if (const char* err = check_exit_args(ba.f)) return err;
  if (ba.blocks < 1 || ba.blocks > ba.f.B) return "backward: blocks must be between 1 and the batch size";
  slvit_stream_t s = reinterpret_cast<slvit_stream_t>(stream);
  switch (ba.f.dtype) {
    case DType::F32: SLVIT_LAUNCH(slvit_backward_kernel<float>, dim3(ba.blocks), dim3(kThreads), 0, s, ba); break;
    case DType::F16: SLVIT_LAUNCH(slvit_backward_kernel<__half>, dim3(ba.blocks), dim3(kThreads), 0, s, ba); break;
    case DType::BF16:
      SLVIT_LAUNCH(slvit_backward_kernel<__nv_bfloat16>, dim3(ba.blocks), dim3(kThreads), 0, s, ba);
      break;
  }
  if (const char* err = SLVIT_CHECK_LAUNCH()) return err;
  const int64_t rblocks = (ba.ptotal + kThreads - 1) / kThreads;
  SLVIT_LAUNCH(slvit_grad_reduce_kernel, dim3((unsigned)(rblocks < 4096 ? rblocks : 4096)), dim3(kThreads), 0, s,
               (const float*)ba.partials, ba.ptotal, ba.blocks, ba.grads);
  return SLVIT_CHECK_LAUNCH();
}

}  // namespace slvit
