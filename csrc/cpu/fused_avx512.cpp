// AVX-512 GEMM micro-kernels of the fused inference forward (fused_tiles.h; callers: fused_avx2.cpp).
//
// This translation unit is compiled for AVX-512F/DQ/BW/VL (the pragma below) and is only entered after
// the run-time check (avx512_missing() in fused_avx2.cpp) said the CPU and OS support it. Like
// fused_avx2.cpp it uses no std:: templates: an inline function instantiated here with AVX-512 code
// could be picked by the linker for the rest of the library too. Everything here has internal
// linkage except gemm_sh_avx512.
//
// One tile = MR weight rows x 1 or 2 blocks of 16 token columns (one zmm accumulator per row and
// block): per k step it loads the B vector(s) and broadcasts one A value per row from memory, so loads
// per FMA are (NB + MR) / (NB * MR). 12 rows x 2 blocks (24 accumulators) is the main tile, 16 x 1 for
// a last single block; tile heights are balanced across a worker's rows. The epilogue is the AVX2
// tile's (alpha, col_scale, row_bias, add, GELU/ReLU with the same rational erf), and columns past
// nvalid are masked on every access (B included).
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_ps() as the unused merge source of max/rcp14/...,
// which -Wall reports as "may be used uninitialized" inside the intrinsic headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "fused_tiles.h"

#include <immintrin.h>

namespace slvit_fused {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// exp: fused_avx2.cpp's exp_ps (Cephes-style range reduction + degree-5 polynomial), term for term.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f), x);
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

// erf: the odd/even rational minimax approximation of fused_avx2.cpp's erf_ps (Eigen/XLA's float
// erf), term for term, so both instruction sets give the same GELU up to rounding. erf512_ratio: the
// numerator (times x) and the denominator, erf = their quotient (erf512 divides by reciprocal,
// gelu_forward_grad_avx512 with a true divide).
inline void erf512_ratio(__m512 x, __m512& xnum, __m512& den) {
  x = _mm512_min_ps(_mm512_set1_ps(4.f), x);  // constant first: NaN stays NaN
  x = _mm512_max_ps(_mm512_set1_ps(-4.f), x);
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 num = _mm512_set1_ps(-2.72614225801306e-10f);
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(2.77068142495902e-08f));
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(-2.10102402082508e-06f));
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(-5.69250639462346e-05f));
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(-7.34990630326855e-04f));
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(-2.95459980854025e-03f));
  num = _mm512_fmadd_ps(num, x2, _mm512_set1_ps(-1.60960333262415e-02f));
  den = _mm512_set1_ps(-1.45660718464996e-05f);
  den = _mm512_fmadd_ps(den, x2, _mm512_set1_ps(-2.13374055278905e-04f));
  den = _mm512_fmadd_ps(den, x2, _mm512_set1_ps(-1.68282697438203e-03f));
  den = _mm512_fmadd_ps(den, x2, _mm512_set1_ps(-7.37332916720468e-03f));
  den = _mm512_fmadd_ps(den, x2, _mm512_set1_ps(-1.42647390514189e-02f));
  xnum = _mm512_mul_ps(x, num);
}

inline __m512 erf512(__m512 x) {
  __m512 xnum, den;
  erf512_ratio(x, xnum, den);
  // num / den as num * (1/den): a zmm divide issues once per ~10 cycles and GELU sits in the fc1
  // epilogue of every element; rcp14 plus one Newton step is within ~1 ulp of the quotient.
  __m512 r = _mm512_rcp14_ps(den);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(xnum, r);
}

inline __m512 gelu512(__m512 x) {
  const __m512 c = erf512(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), c));
}

inline __m512 act512(__m512 x, int act) {
  if (act == kGelu) return gelu512(x);
  if (act == kRelu) return _mm512_max_ps(_mm512_setzero_ps(), x);  // constant first: NaN stays NaN
  return x;
}

// n k steps of tile512 into acc (the row-group pointers ag and b advance past them).
template <int MR, int NB, bool TAIL>
__attribute__((always_inline)) inline void k_steps512(__m512 (&acc)[MR][NB], const float* (&ag)[(MR + 3) / 4],
                                                      const float*& b, int64_t n, int64_t a_rs, int64_t a_ks,
                                                      int64_t ldb, int64_t bstep, __mmask16 m) {
  for (int64_t k = 0; k < n; ++k) {
    __m512 bv[NB];
#pragma GCC unroll 2
    for (int v = 0; v < NB; ++v)
      bv[v] = (TAIL && v == NB - 1) ? _mm512_maskz_loadu_ps(m, b + v * bstep) : _mm512_loadu_ps(b + v * bstep);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float* p = ag[r / 4];
      const float x = (r % 4 == 0) ? p[0] : (r % 4 == 1) ? p[a_rs] : (r % 4 == 2) ? p[2 * a_rs] : p[3 * a_rs];
      const __m512 av = _mm512_set1_ps(x);
#pragma GCC unroll 2
      for (int v = 0; v < NB; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
#pragma GCC unroll 4
    for (int g = 0; g < (MR + 3) / 4; ++g) ag[g] += a_ks;
    b += ldb;
  }
}

// MR rows x NB*16 columns (NB = 1 or 2 column blocks, the second one bstep floats after the first: 16
// for row-major B, b_blk for panels). TAIL: only the first nvalid columns of the last block are read
// or written (nvalid = the columns of that block, 1..15). A K loop longer than Shape::k_block is summed
// in blocks (fused_tiles.h), as the AVX2 tile does.
template <int MR, int NB, bool TAIL>
void tile512(const Shape& sh, const float* A, const float* Bm, int64_t bstep, float* C, const float* rbias,
             const float* add, int64_t ld_add, float alpha, int act, int nvalid, const float* cscale) {
  const __mmask16 m = TAIL ? (__mmask16)((1u << nvalid) - 1u) : (__mmask16)0xFFFF;
  __m512 acc[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NB; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t K = sh.K, a_rs = sh.a_rs, a_ks = sh.a_ks, ldb = sh.ldb;
  const int64_t kb = sh.k_block > 0 ? sh.k_block : sh.k_block < 0 ? INT64_MAX : kKBlock;
  // rows in groups of 4 from one base pointer each ([p], [p + rs], [p + 2 rs], [p + 3 rs] are all
  // base + index*scale addresses): one pointer per row would need more than the 16 general registers
  // and the compiler then parks pointers in vector registers (an extra uop on an FMA port per row).
  const float* ag[(MR + 3) / 4];
  if (K * sh.nseg <= kb) {  // short K (most GEMMs): one in-order pass, no partial buffer
    for (int64_t seg = 0; seg < sh.nseg; ++seg) {
      const float* a = A + seg * sh.a_seg;
      const float* b = Bm + seg * sh.b_seg;
#pragma GCC unroll 4
      for (int g = 0; g < (MR + 3) / 4; ++g) ag[g] = a + 4 * g * a_rs;
      k_steps512<MR, NB, TAIL>(acc, ag, b, K, a_rs, a_ks, ldb, bstep, m);
    }
  } else {
    // blocks of kb k steps across segments; each full block's sums go into `part` (Shape::k_block)
    __m512 part[MR][NB];
    bool have = false;
    int64_t room = kb, left = K * sh.nseg;
    for (int64_t seg = 0; seg < sh.nseg; ++seg) {
      const float* a = A + seg * sh.a_seg;
      const float* b = Bm + seg * sh.b_seg;
#pragma GCC unroll 4
      for (int g = 0; g < (MR + 3) / 4; ++g) ag[g] = a + 4 * g * a_rs;
      for (int64_t k = 0; k < K;) {
        const int64_t n = imin(K - k, room);
        k_steps512<MR, NB, TAIL>(acc, ag, b, n, a_rs, a_ks, ldb, bstep, m);
        k += n;
        room -= n;
        left -= n;
        if (room == 0 && left > 0) {
#pragma GCC unroll 16
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int v = 0; v < NB; ++v) {
              part[r][v] = have ? _mm512_add_ps(part[r][v], acc[r][v]) : acc[r][v];
              acc[r][v] = _mm512_setzero_ps();
            }
          have = true;
          room = kb;
        }
      }
    }
    if (have)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < NB; ++v) acc[r][v] = _mm512_add_ps(part[r][v], acc[r][v]);
  }
  const int64_t ldc = sh.ldc;
#pragma GCC unroll 2
  for (int v = 0; v < NB; ++v) {
    const bool tail = TAIL && v == NB - 1;
    const __m512 cs = !cscale ? _mm512_setzero_ps()
                      : tail  ? _mm512_maskz_loadu_ps(m, cscale + 16 * v)
                              : _mm512_loadu_ps(cscale + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512 x = acc[r][v];
      if (alpha != 1.f) x = _mm512_mul_ps(x, _mm512_set1_ps(alpha));
      if (cscale) x = _mm512_mul_ps(x, cs);
      if (rbias) x = _mm512_add_ps(x, _mm512_set1_ps(rbias[r]));
      if (add) {
        const float* ap = add + r * ld_add + 16 * v;
        x = _mm512_add_ps(x, tail ? _mm512_maskz_loadu_ps(m, ap) : _mm512_loadu_ps(ap));
      }
      x = act512(x, act);
      float* cp = C + r * ldc + 16 * v;
      if (tail)
        _mm512_mask_storeu_ps(cp, m, x);
      else
        _mm512_storeu_ps(cp, x);
    }
  }
}

typedef void (*tile_fn)(const Shape&, const float*, const float*, int64_t, float*, const float*, const float*, int64_t,
                        float, int, int, const float*);

// Tallest tiles: one block, 16 rows (16 accumulators + B of 32 zmm registers, 17 loads per 16 FMAs);
// two blocks, 12 rows (24 accumulators + 2 B, 14 loads per 24 FMAs).
constexpr int kMaxMR1 = 16, kMaxMR2 = 12;

#define SLVIT_T1(T) \
  {tile512<1, 1, T>, tile512<2, 1, T>, tile512<3, 1, T>, tile512<4, 1, T>, tile512<5, 1, T>, tile512<6, 1, T>, \
   tile512<7, 1, T>, tile512<8, 1, T>, tile512<9, 1, T>, tile512<10, 1, T>, tile512<11, 1, T>, tile512<12, 1, T>, \
   tile512<13, 1, T>, tile512<14, 1, T>, tile512<15, 1, T>, tile512<16, 1, T>}
#define SLVIT_T2(T) \
  {tile512<1, 2, T>, tile512<2, 2, T>, tile512<3, 2, T>, tile512<4, 2, T>, tile512<5, 2, T>, tile512<6, 2, T>, \
   tile512<7, 2, T>, tile512<8, 2, T>, tile512<9, 2, T>, tile512<10, 2, T>, tile512<11, 2, T>, tile512<12, 2, T>, \
   nullptr, nullptr, nullptr, nullptr}
const tile_fn kTiles[2][2][16] = {{SLVIT_T1(false), SLVIT_T1(true)}, {SLVIT_T2(false), SLVIT_T2(true)}};
#undef SLVIT_T1
#undef SLVIT_T2

}  // namespace

void gemm_sh_avx512(int64_t r0, int64_t r1, int64_t ncols, const Shape& sh, const float* A, const float* Bm, float* C,
                    const Epi& e, int64_t b_blk) {
  const int64_t rows = r1 - r0;
  if (rows <= 0) return;
  const int64_t bstep = b_blk ? b_blk : 16;
  for (int64_t c = 0; c < ncols;) {
    const int64_t left = ncols - c;
    const int nb = left > 16 ? 2 : 1;
    const int nvalid = (int)imin(16, left - 16 * (nb - 1));
    const int tail = nvalid < 16 ? 1 : 0;
    const int maxmr = nb == 2 ? kMaxMR2 : kMaxMR1;
    // Equal tile heights (32 rows = 2 x 16, 20 = 2 x 10): a short remainder tile would leave FMA
    // latency uncovered (4-cycle FMAs on 2 ports need >= 8 independent accumulators).
    const int64_t ntile = (rows + maxmr - 1) / maxmr;
    const float* bc = b_blk ? Bm + (c / 16) * b_blk : Bm + c;
    for (int64_t t = 0; t < ntile; ++t) {
      const int64_t lo = r0 + rows * t / ntile, hi = r0 + rows * (t + 1) / ntile;
      kTiles[nb - 1][tail][hi - lo - 1](sh, A + lo * sh.a_rs, bc, bstep, C + lo * sh.ldc + c,
                                        e.row_bias ? e.row_bias + lo : nullptr,
                                        e.add ? e.add + lo * e.ld_add + c : nullptr, e.ld_add, e.alpha, e.act, nvalid,
                                        e.col_scale ? e.col_scale + c : nullptr);
    }
    c += 16 * nb;
  }
}

void gelu_forward_grad_avx512(const float* x, float* y, float* dydx, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);  // read before dydx (which may be x) is written
    __m512 xnum, den;
    erf512_ratio(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)), xnum, den);
    const __m512 e = _mm512_div_ps(xnum, den);  // a true divide: fused_avx2.cpp's erf_ps bits
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v),
                                                  _mm512_add_ps(_mm512_set1_ps(1.f), e)));
    const __m512 cdf = _mm512_fmadd_ps(_mm512_set1_ps(0.5f), e, _mm512_set1_ps(0.5f));
    const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f),
                                     exp512(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(v, v))));
    _mm512_mask_storeu_ps(dydx + i, m, _mm512_fmadd_ps(v, pdf, cdf));
  }
}

void gather_px4_avx512(const float* const src[16], const int64_t sc[16], const int64_t sh[16], int64_t ph, int64_t seg,
                       float* panel, int64_t c0, int64_t c1, const float* const rows[], int nrows, int64_t row_bytes,
                       int64_t plane) {
  constexpr int64_t kAhead = 4;  // as fused_avx2.cpp's gather: channel planes are too far apart for the prefetcher
  for (int64_t c = c0; c < c1; ++c) {
    if (c + kAhead < c1)
      for (int r = 0; r < nrows; ++r) {
        const char* q = (const char*)(rows[r] + (c + kAhead) * plane);
        for (int64_t bo = 0; bo < row_bytes; bo += 64) _mm_prefetch(q + bo, _MM_HINT_T0);
      }
    for (int64_t i = 0; i < ph; ++i) {
      // z[g] lane u = the 4 pixels of token g + 4u; a 4x4 transpose inside every 128-bit lane then gives
      // pixel j of tokens 0..15 in order in one register.
      __m512 z[4];
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        __m512 v = _mm512_castps128_ps512(_mm_loadu_ps(src[g] + c * sc[g] + i * sh[g]));
        v = _mm512_insertf32x4(v, _mm_loadu_ps(src[g + 4] + c * sc[g + 4] + i * sh[g + 4]), 1);
        v = _mm512_insertf32x4(v, _mm_loadu_ps(src[g + 8] + c * sc[g + 8] + i * sh[g + 8]), 2);
        z[g] = _mm512_insertf32x4(v, _mm_loadu_ps(src[g + 12] + c * sc[g + 12] + i * sh[g + 12]), 3);
      }
      const __m512 t0 = _mm512_unpacklo_ps(z[0], z[1]), t1 = _mm512_unpacklo_ps(z[2], z[3]);
      const __m512 t2 = _mm512_unpackhi_ps(z[0], z[1]), t3 = _mm512_unpackhi_ps(z[2], z[3]);
      float* dst = panel + (i * 4) * seg + c * 16;
      _mm512_storeu_ps(dst, _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
      _mm512_storeu_ps(dst + seg, _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
      _mm512_storeu_ps(dst + 2 * seg, _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3))));
      _mm512_storeu_ps(dst + 3 * seg, _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t2), _mm512_castps_pd(t3))));
    }
  }
}

void softmax_cols_avx512(float* St, int64_t T, int64_t ncol, int64_t ldS, float* inv_sum) {
  for (int64_t cb = 0; cb < ncol; cb += 16) {
    const int64_t n = imin(16, ncol - cb);
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    float* s = St + cb;
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < T; ++j) mx = _mm512_max_ps(_mm512_maskz_loadu_ps(m, s + j * ldS), mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < T; ++j) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j * ldS), mx));
      _mm512_mask_storeu_ps(s + j * ldS, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_mask_storeu_ps(inv_sum + cb, m, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
  }
}

}  // namespace slvit_fused
