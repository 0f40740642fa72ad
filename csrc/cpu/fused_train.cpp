// Kernels of the fused CPU training path. API and layout: fused_train.h.
//
// Compiled for AVX2+FMA (the pragma below) and only entered after slvit_fused::cpu_supported() said
// yes. Like fused_avx2.cpp it uses no std:: templates (an inline function instantiated here with AVX2
// code could be picked by the linker for the rest of the library); everything but the API has internal
// linkage.
#pragma GCC target("avx2,fma")

#include "fused_train.h"

#include "fused_tiles.h"

#include <immintrin.h>

#include <cmath>

namespace slvit_train {
namespace {

using slvit_fused::Epi;
using slvit_fused::Shape;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// exp: fused_avx2.cpp's exp_ps, term for term (Cephes-style range reduction + degree-5 polynomial).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

inline __m256i tail_mask(int64_t n) {  // first n lanes on (0 <= n <= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// C (rows x cols, ldc) = alpha * A B on the inference tiles; A[r][k] at A + r*a_rs + k*a_ks.
inline void gemm(int isa, int64_t rows, int64_t cols, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                 const float* B, int64_t ldb, float* C, int64_t ldc, float alpha = 1.f) {
  Shape sh;
  sh.K = K; sh.a_rs = a_rs; sh.a_ks = a_ks; sh.ldb = ldb; sh.ldc = ldc;
  // B is often a strided view of qkv / dO rows with no column padding: the AVX2 tiles must not read
  // past column `cols` (the next rows may belong to another worker; found by ThreadSanitizer)
  sh.b_masked_tail = true;
  Epi e;
  e.alpha = alpha;
  slvit_fused::gemm_tiles(isa, 0, rows, cols, sh, A, B, C, e);
}

// C[r][j] = alpha * A_r . Bt_j for rows r < rows and columns j in [c0, c1): A rows lda apart, Bt rows
// (the B operand's columns) ldbt apart, K contiguous floats each.
void dot_cols(int64_t rows, int64_t c0, int64_t c1, int64_t K, const float* A, int64_t lda, const float* Bt,
              int64_t ldbt, float* C, int64_t ldc, float alpha) {
  const int64_t k8 = K & ~int64_t(7);
  const __m256i tm = tail_mask(K - k8);
  for (int64_t j = c0; j < c1; ++j) {
    const float* bt = Bt + j * ldbt;
    for (int64_t r = 0; r < rows; ++r) {
      const float* ar = A + r * lda;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < k8; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ar + k), _mm256_loadu_ps(bt + k), acc);
      if (k8 < K) acc = _mm256_fmadd_ps(_mm256_maskload_ps(ar + k8, tm), _mm256_maskload_ps(bt + k8, tm), acc);
      C[r * ldc + j] = alpha * hsum(acc);
    }
  }
}

// The T x T products (scores, dP) on the tiles spend a whole 16-column block on the last T % 16 columns
// (T = 49: 15 of 64 computed columns are padding). When only a few columns are left over, the tiles take
// the first T - T % 16 and the rest are dot products.
inline int64_t tile_cols(int64_t T) {
  const int64_t rem = T % 16;
  return T > 16 && rem > 0 && rem <= 3 ? T - rem : T;
}

// dst (cols x ldd) = src^T for src (rows x cols, lds); columns of dst past `rows` up to the next
// 16-column boundary are zeroed (the AVX2 tiles read B up to it unless told to mask). 8 x 8 blocks transposed in registers (the
// scalar loop was a third of the attention forward's own time); row and column tails scalar (a load past
// column `cols` could leave the buffer on the last row).
void transpose_pad(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  const int64_t r8 = rows & ~int64_t(7), c8 = cols & ~int64_t(7);
  for (int64_t c0 = 0; c0 < c8; c0 += 8) {
    for (int64_t r0 = 0; r0 < r8; r0 += 8) {
      const float* s = src + r0 * lds + c0;
      __m256 a0 = _mm256_loadu_ps(s), a1 = _mm256_loadu_ps(s + lds), a2 = _mm256_loadu_ps(s + 2 * lds),
             a3 = _mm256_loadu_ps(s + 3 * lds), a4 = _mm256_loadu_ps(s + 4 * lds), a5 = _mm256_loadu_ps(s + 5 * lds),
             a6 = _mm256_loadu_ps(s + 6 * lds), a7 = _mm256_loadu_ps(s + 7 * lds);
      const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
      const __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + c0 * ldd + r0;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t c = c0; c < c0 + 8; ++c)
      for (int64_t r = r8; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
  for (int64_t c = c8; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
  // zero padding up to the next 16-column boundary (what the unmasked AVX2 tiles read; gemm() masks)
  const int64_t pad_end = (rows + 15) / 16 * 16 < ldd ? (rows + 15) / 16 * 16 : ldd;
  const __m256 z = _mm256_setzero_ps();
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ldd;
    if (rows + 16 <= ldd) {
      _mm256_storeu_ps(d + rows, z);
      _mm256_storeu_ps(d + rows + 8, z);
    } else {
      for (int64_t r = rows; r < pad_end; ++r) d[r] = 0.f;
    }
  }
}

// Row softmax for T <= 64: a row's exponentials stay in (up to) 8 registers between the sum and the
// scaling, so P is stored once (the general loop below stores, reloads and stores again: the store was
// the forward's hottest instruction at T = 49). Same exp and the same summation order as the loop.
void softmax_rows_short(const float* Sc, int64_t lds, float* P, int64_t T) {
  const int64_t nv = (T + 7) / 8, tail = T - (nv - 1) * 8;  // vectors per row, lanes of the last (1..8)
  const __m256i tm = tail_mask(tail);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < T; ++i) {
    const float* s = Sc + i * lds;
    float* p = P + i * T;
    __m256 v[8] = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};  // (-Wmaybe-uninitialized: lanes past nv unused)
    __m256 mx = ninf;
    for (int k = 0; k < 8; ++k) {
      if (k + 1 < nv) {
        v[k] = _mm256_loadu_ps(s + 8 * k);
      } else if (k + 1 == nv) {
        v[k] = _mm256_blendv_ps(ninf, _mm256_maskload_ps(s + 8 * k, tm), _mm256_castsi256_ps(tm));
      } else {
        break;
      }
      mx = _mm256_max_ps(v[k], mx);
    }
    const __m256 rmax = _mm256_set1_ps(hmax(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < 8 && k < nv; ++k) {
      v[k] = exp_ps(_mm256_sub_ps(v[k], rmax));
      if (k + 1 == nv) v[k] = _mm256_and_ps(v[k], _mm256_castsi256_ps(tm));
      sum = _mm256_add_ps(sum, v[k]);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int k = 0; k < 8 && k < nv; ++k) {
      if (k + 1 < nv) _mm256_storeu_ps(p + 8 * k, _mm256_mul_ps(v[k], inv));
      else _mm256_maskstore_ps(p + 8 * k, tm, _mm256_mul_ps(v[k], inv));
    }
  }
}

// Row softmax of a T x T score block (row stride lds) into P (row stride T).
void softmax_rows(const float* Sc, int64_t lds, float* P, int64_t T) {
  if (T <= 64) {
    softmax_rows_short(Sc, lds, P, T);
    return;
  }
  const int64_t full = T & ~int64_t(7), tail = T - full;
  const __m256i tm = tail_mask(tail);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  for (int64_t i = 0; i < T; ++i) {
    const float* s = Sc + i * lds;
    float* p = P + i * T;
    __m256 mx = ninf;
    for (int64_t j = 0; j < full; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(s + j), mx);
    if (tail) mx = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_maskload_ps(s + full, tm), _mm256_castsi256_ps(tm)), mx);
    const __m256 rmax = _mm256_set1_ps(hmax(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j), rmax));
      _mm256_storeu_ps(p + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (tail) {
      const __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(_mm256_maskload_ps(s + full, tm), rmax)), _mm256_castsi256_ps(tm));
      _mm256_maskstore_ps(p + full, tm, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inv));
    if (tail) _mm256_maskstore_ps(p + full, tm, _mm256_mul_ps(_mm256_maskload_ps(p + full, tm), inv));
  }
}

// dS = P * (dPm - rowsum(P * dPm)), dPm = dP * mask, in place in dP (row stride ldp); P row stride T.
void softmax_backward_rows(const float* P, const float* mask, float* dP, int64_t ldp, int64_t T) {
  const int64_t full = T & ~int64_t(7), tail = T - full;
  const __m256i tm = tail_mask(tail);
  for (int64_t i = 0; i < T; ++i) {
    const float* p = P + i * T;
    float* d = dP + i * ldp;
    if (mask) {
      const float* m = mask + i * T;
      for (int64_t j = 0; j < T; ++j) d[j] *= m[j];
    }
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(d + j), acc);
    if (tail) acc = _mm256_fmadd_ps(_mm256_maskload_ps(p + full, tm), _mm256_maskload_ps(d + full, tm), acc);
    const __m256 dot = _mm256_set1_ps(hsum(acc));
    for (int64_t j = 0; j < full; j += 8)
      _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(d + j), dot)));
    if (tail)
      _mm256_maskstore_ps(d + full, tm,
                          _mm256_mul_ps(_mm256_maskload_ps(p + full, tm), _mm256_sub_ps(_mm256_maskload_ps(d + full, tm), dot)));
  }
}

// Prefetch part `part` of `parts` of [p, p + n floats) into L2. The attention loops walk one sample's
// rows of qkv / P / dO head by head, each head a strip of short pieces of rows 1-5 KB apart that the
// hardware prefetchers miss; each head of sample b fetches 1/heads of sample b + 1's contiguous blocks.
inline void prefetch_part(const float* p, int64_t n, int64_t part, int64_t parts) {
  if (!p || n <= 0) return;
  const char* c = (const char*)p;
  const int64_t bytes = n * 4, lo = bytes * part / parts, hi = bytes * (part + 1) / parts;
  for (int64_t o = lo & ~int64_t(63); o < hi; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

struct Scratch {
  float *T1, *T2, *Pd;  // kd x Tp transposed operand; T x Tp scores / dP; T x T dropped P
};

Scratch carve(const AttnChunk& a) {
  const int64_t Tp = round_up(a.T, 16) + 16;
  Scratch s;
  s.T1 = a.scratch;
  s.T2 = s.T1 + a.kd * Tp;
  s.Pd = s.T2 + a.T * Tp;
  return s;
}

}  // namespace

int64_t attn_scratch_floats(int64_t T, int64_t kd) {
  const int64_t Tp = round_up(T, 16) + 16;
  return kd * Tp + T * Tp + T * T + 64;
}

void attn_forward_chunk(const AttnChunk& a) {
  const int64_t T = a.T, kd = a.kd, A3 = 3 * a.A, Tp = round_up(T, 16) + 16;
  const int64_t Tc = tile_cols(T);
  const Scratch s = carve(a);
  for (int64_t b = 0; b < a.S; ++b)
    for (int64_t h = 0; h < a.heads; ++h) {
      const float* q = a.qkv + b * T * A3 + h * kd;
      const float* k = q + a.A;
      const float* v = q + 2 * a.A;
      float* P = a.P + (b * a.heads + h) * T * T;
      if (b + 1 < a.S) prefetch_part(a.qkv + (b + 1) * T * A3, T * A3, h, a.heads);
      transpose_pad(k, A3, T, kd, s.T1, Tp);                        // K^T: kd x T
      gemm(a.isa, T, Tc, kd, q, A3, 1, s.T1, Tp, s.T2, Tp, a.scale);  // scores[i][j] = s q_i . k_j
      dot_cols(T, Tc, T, kd, q, A3, k, A3, s.T2, Tp, a.scale);       // (columns past the tiles' blocks)
      softmax_rows(s.T2, Tp, P, T);
      const float* Pu = P;
      if (a.mask) {
        const float* m = a.mask + (b * a.heads + h) * T * T;
        for (int64_t e = 0; e < T * T; ++e) s.Pd[e] = P[e] * m[e];
        Pu = s.Pd;
      }
      gemm(a.isa, T, kd, T, Pu, T, 1, v, A3, a.o + b * T * a.A + h * kd, a.A);  // o_i = sum_j P[i][j] v_j
    }
}

void attn_backward_chunk(const AttnChunk& a) {
  const int64_t T = a.T, kd = a.kd, A3 = 3 * a.A, Tp = round_up(T, 16) + 16;
  const int64_t Tc = tile_cols(T);
  const Scratch s = carve(a);
  for (int64_t b = 0; b < a.S; ++b)
    for (int64_t h = 0; h < a.heads; ++h) {
      const int64_t bh = b * a.heads + h;
      const float* q = a.qkv + b * T * A3 + h * kd;
      const float* k = q + a.A;
      const float* v = q + 2 * a.A;
      const float* P = a.P + bh * T * T;
      const float* m = a.mask ? a.mask + bh * T * T : nullptr;
      const float* dO = a.dO + b * T * a.A + h * kd;
      float* dq = a.dqkv + b * T * A3 + h * kd;
      float* dk = dq + a.A;
      float* dv = dq + 2 * a.A;
      if (b + 1 < a.S) {
        prefetch_part(a.qkv + (b + 1) * T * A3, T * A3, h, a.heads);
        prefetch_part(a.P + (b + 1) * a.heads * T * T, a.heads * T * T, h, a.heads);
        prefetch_part(a.dO + (b + 1) * T * a.A, T * a.A, h, a.heads);
      }
      const float* Pu = P;
      if (m) {
        for (int64_t e = 0; e < T * T; ++e) s.Pd[e] = P[e] * m[e];
        Pu = s.Pd;
      }
      gemm(a.isa, T, kd, T, Pu, 1, T, dO, a.A, dv, A3);  // dv_j = sum_i Pd[i][j] dO_i
      transpose_pad(v, A3, T, kd, s.T1, Tp);              // V^T: kd x T
      gemm(a.isa, T, Tc, kd, dO, a.A, 1, s.T1, Tp, s.T2, Tp);  // dP[i][j] = dO_i . v_j
      dot_cols(T, Tc, T, kd, dO, a.A, v, A3, s.T2, Tp, 1.f);     // (columns past the tiles' blocks)
      softmax_backward_rows(P, m, s.T2, Tp, T);               // -> dS
      gemm(a.isa, T, kd, T, s.T2, Tp, 1, k, A3, dq, A3, a.scale);  // dq_i = s sum_j dS[i][j] k_j
      gemm(a.isa, T, kd, T, s.T2, 1, Tp, q, A3, dk, A3, a.scale);  // dk_j = s sum_i dS[i][j] q_i
    }
}

void colsum_add(const float* X, int64_t rows, int64_t cols, int64_t ld, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * ld;
    for (int64_t c = 0; c < cols; ++c) acc[c] += x[c];
  }
}

void mul_colsum_add(float* G, const float* D, int64_t rows, int64_t cols, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    float* g = G + r * cols;
    const float* d = D + r * cols;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(g + c), _mm256_loadu_ps(d + c));
      _mm256_storeu_ps(g + c, v);
      _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), v));
    }
    for (; c < cols; ++c) {
      const float v = g[c] * d[c];
      g[c] = v;
      acc[c] += v;
    }
  }
}

}  // namespace slvit_train
