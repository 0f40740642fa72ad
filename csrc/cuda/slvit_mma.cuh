// Warp-level tensor-core GEMM for the exit kernels (mma.sync through inline PTX; under the SIMT emulator
// the same calls go to emu::mma_sync, which implements the PTX ISA fragment layouts independently).
//
//   S = __half / __nv_bfloat16: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   S = float (TF32 allowed):   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (cvt.rna.tf32.f32)
// Accumulation is float32 in both cases. sm_80+ (the extension is built for sm_80 and sm_90).
//
// block_gemm_tc: out[r, n] = epi(r, n, sum_k A(r, k) W[n, k]) for r < rows, n < cols, where A(r, k) is a
// float32 value produced by a loader (activations in the workspace, a patch gathered from the feature
// map, GELU applied on the fly) and W is a (cols, K) row-major weight of type S (torch Linear layout,
// which is exactly the "col" B operand: B[k, n] = W[n, k]). Each warp owns 16 x (8 * kNT) output tiles;
// the A fragment is loaded once per k-step and reused for the kNT column sub-tiles.
#pragma once

#include <cstdint>
#include <cstring>

namespace slvit {

template <class S>
struct MmaTraits;
template <>
struct MmaTraits<__half> {
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<__nv_bfloat16> {
  static constexpr int kK = 16;
};
template <>
struct MmaTraits<float> {
  static constexpr int kK = 8;
};

// Raw 16-bit pattern of a float rounded to S (round to nearest even, like torch's conversion).
__device__ __forceinline__ uint32_t bits16(__half v) {
  uint16_t r;
  memcpy(&r, &v, 2);
  return r;
}
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) {
  uint16_t r;
  memcpy(&r, &v, 2);
  return r;
}
template <class S>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);  // element lo in the low half
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  return bits16(__float2half(lo)) | (bits16(__float2half(hi)) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  return bits16(__float2bfloat16(lo)) | (bits16(__float2bfloat16(hi)) << 16);
}
__device__ __forceinline__ uint32_t raw_pair(const __half* p, bool ok0, bool ok1) {
  return (ok0 ? bits16(p[0]) : 0u) | ((ok1 ? bits16(p[1]) : 0u) << 16);
}
__device__ __forceinline__ uint32_t raw_pair(const __nv_bfloat16* p, bool ok0, bool ok1) {
  return (ok0 ? bits16(p[0]) : 0u) | ((ok1 ? bits16(p[1]) : 0u) << 16);
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef SLVIT_EMULATE
  return ::emu::cvt_rna_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

// d += A * B on one warp (all 32 lanes). The three specializations below differ only in the PTX
// instruction (shape and operand types); inline asm takes its instruction as a string literal, so they
// are spelled out instead of sharing one body.
template <class S>
__device__ __forceinline__ void mma_tile(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma_tile<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SLVIT_EMULATE
  ::emu::mma_sync(::emu::MmaKind::F16, d, a, b, d);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_tile<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SLVIT_EMULATE
  ::emu::mma_sync(::emu::MmaKind::BF16, d, a, b, d);
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_tile<float>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef SLVIT_EMULATE
  ::emu::mma_sync(::emu::MmaKind::TF32, d, a, b, d);
#else
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Fragment loaders (PTX ISA 9.7.14.5.7 / 9.7.14.5.8; g = laneid >> 2, t = laneid % 4).
// m16n8k16 A: register j holds rows g (+8 for j = 1, 3), columns 2t, 2t+1 (+8 for j = 2, 3).
// m16n8k8 tf32 A: register j holds row g (+8 for j = 1, 3), column t (+4 for j = 2, 3).
template <class S, class ALoad>
__device__ __forceinline__ void load_a_frag(uint32_t a[4], ALoad& at, int rows, int K, int r0, int k0, int g, int t) {
  if constexpr (MmaTraits<S>::kK == 16) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + g + ((j & 1) ? 8 : 0), k = k0 + 2 * t + ((j & 2) ? 8 : 0);
      const bool rok = r < rows;
      a[j] = pack_pair<S>(rok && k < K ? at(r, k) : 0.f, rok && k + 1 < K ? at(r, k + 1) : 0.f);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + g + ((j & 1) ? 8 : 0), k = k0 + t + ((j & 2) ? 4 : 0);
      a[j] = to_tf32(r < rows && k < K ? at(r, k) : 0.f);
    }
  }
}
// m16n8k16 B: register j holds rows (k) 2t, 2t+1 (+8 for j = 1) of column n = g; tf32: k = t (+4 for j = 1).
template <class S>
__device__ __forceinline__ void load_b_frag(uint32_t b[2], const S* W, int64_t ldw, int cols, int K, int n, int k0,
                                            int t) {
  const bool nok = n < cols;
  const S* w = W + (int64_t)(nok ? n : 0) * ldw;
  if constexpr (MmaTraits<S>::kK == 16) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + 2 * t + 8 * j;
      b[j] = raw_pair(w + k, nok && k < K, nok && k + 1 < K);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + t + 4 * j;
      b[j] = to_tf32(nok && k < K ? w[k] : 0.f);
    }
  }
}

constexpr int kNT = 2;  // n8 sub-tiles per warp tile (16 x 16 outputs per warp)

// B fragment from a float32 loader bt(n, k) (activations: K or V from the workspace), rounded like A.
template <class S, class BLoad>
__device__ __forceinline__ void load_b_frag_f(uint32_t b[2], BLoad& bt, int cols, int K, int n, int k0, int t) {
  const bool nok = n < cols;
  if constexpr (MmaTraits<S>::kK == 16) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + 2 * t + 8 * j;
      b[j] = pack_pair<S>(nok && k < K ? bt(n, k) : 0.f, nok && k + 1 < K ? bt(n, k + 1) : 0.f);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int k = k0 + t + 4 * j;
      b[j] = to_tf32(nok && k < K ? bt(n, k) : 0.f);
    }
  }
}

// The warp-tiled loop shared by both GEMM forms; bfrag(b, n, k0, t) loads a B fragment.
template <class S, class ALoad, class BFrag, class Epi>
__device__ void block_gemm_tc_core(int rows, int cols, int K, ALoad& at, BFrag&& bfrag, Epi& epi) {
  constexpr int kK = MmaTraits<S>::kK;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  const int g = lane >> 2, t = lane & 3;
  const int rtiles = (rows + 15) / 16, ctiles = (cols + 8 * kNT - 1) / (8 * kNT);
  for (int tile = warp; tile < rtiles * ctiles; tile += nwarps) {  // warp-uniform: every lane runs each mma
    const int r0 = (tile / ctiles) * 16, c0 = (tile % ctiles) * 8 * kNT;
    float acc[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int k0 = 0; k0 < K; k0 += kK) {
      uint32_t a[4];
      load_a_frag<S>(a, at, rows, K, r0, k0, g, t);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        uint32_t b[2];
        bfrag(b, c0 + 8 * j + g, k0, t);
        mma_tile<S>(acc[j], a, b);
      }
    }
    // C/D: element i at row g (+8 for i >= 2), column 2t + (i & 1)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = r0 + g + ((i & 2) ? 8 : 0), c = c0 + 8 * j + 2 * t + (i & 1);
        if (r < rows && c < cols) epi(r, c, acc[j][i]);
      }
  }
}

// B = W^T for a (cols, K) row-major weight of type S.
template <class S, class ALoad, class Epi>
__device__ void block_gemm_tc(int rows, int cols, int K, ALoad at, const S* W, int64_t ldw, Epi epi) {
  block_gemm_tc_core<S>(rows, cols, K, at,
                        [&](uint32_t b[2], int n, int k0, int t) { load_b_frag<S>(b, W, ldw, cols, K, n, k0, t); },
                        epi);
}

// B[k, n] = bt(n, k) from float32 values (rounded to S / tf32 like A).
template <class S, class ALoad, class BLoad, class Epi>
__device__ void block_gemm_tc_f(int rows, int cols, int K, ALoad at, BLoad bt, Epi epi) {
  block_gemm_tc_core<S>(rows, cols, K, at,
                        [&](uint32_t b[2], int n, int k0, int t) { load_b_frag_f<S>(b, bt, cols, K, n, k0, t); },
                        epi);
}

}  // namespace slvit
