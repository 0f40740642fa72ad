// Kernels of the fused CPU training path (train_fused_path.cpp: the forward and backward with
// SLVIT_FAST_CPU_TRAIN_FUSED on), plain C++ API, no torch types. Their GEMMs run on the inference
// kernels' micro-tiles (fused_tiles.h: gemm_tiles, AVX2 6 x 16 or AVX-512 12 x 32); this file adds
// what sits between the GEMMs: attention's softmax and its backward, column sums.
//
// Layout: token-major, like the saved activations the ops hand to autograd (rows = tokens of a chunk
// of samples, features contiguous), so every saved tensor is read in place. Weights are the right
// GEMM operand: Y = X W^T reads a transposed copy of W (made once per call, rows padded to 16), the
// data gradient dX = dY W reads W as stored, the weight gradient dW = dY^T X reads dY transposed
// through the A strides and the saved X as the B operand, accumulated per worker in place.
//
// B operands of the AVX2 tiles are read up to the next 16-column boundary: every buffer used as a B
// operand must have 16 readable floats after its last row (callers allocate with that slack).
#pragma once

#include <cstdint>

namespace slvit_train {

// One chunk of S samples of multi-head attention, token-major:
//   qkv: (S*T) x 3A rows (ld 3A): Q columns [0, A), K [A, 2A), V [2A, 3A), head h at h*kd;
//   P:   S*heads blocks of T x T, row = query i, column = key j (softmax over j), contiguous;
//   mask: the attention dropout in P's layout (0 or 1/(1-rate)), or nullptr;
//   o / dO: (S*T) x A (ld A), head h at columns h*kd.
struct AttnChunk {
  int isa;  // slvit_fused::Isa of the GEMM tiles
  int64_t S, T, heads, kd, A;
  float scale;
  const float* qkv;
  float* P;
  const float* mask;
  float* o;         // forward output
  const float* dO;  // backward input (16 floats of slack after its last row)
  float* dqkv;      // backward output, (S*T) x 3A
  float* scratch;   // attn_scratch_floats(T, kd) floats
};

int64_t attn_scratch_floats(int64_t T, int64_t kd);

// Forward: P = softmax(scale Q K^T) per (sample, head) (saved), o = (P * mask) V.
void attn_forward_chunk(const AttnChunk& a);

// Backward: dV = (P*mask)^T dO; dP = (dO V^T) * mask; dS = P * (dP - rowsum(P * dP));
// dQ = scale dS K; dK = scale dS^T Q; written into dqkv.
void attn_backward_chunk(const AttnChunk& a);

// acc[c] += sum over rows r < rows of X[r*ld + c], c < cols (bias gradients).
void colsum_add(const float* X, int64_t rows, int64_t cols, int64_t ld, float* acc);

// G (rows x cols, contiguous) *= D elementwise, then acc[c] += the new column sums (in row order, as
// colsum_add): the GELU backward's multiply by gelu'(hpre) (slvit_fused::gelu_forward_grad) and the fc1
// bias gradient in one pass over G instead of two.
void mul_colsum_add(float* G, const float* D, int64_t rows, int64_t cols, float* acc);

}  // namespace slvit_train
