// Patch embedding straight from the image rows, AVX-512 (fused_tiles.h: embed_rows_avx512,
// pack_patch_weight, embed_rows_wanted). Callers: fused_avx2.cpp's inference forward and
// train_fused_path.cpp's training forward.
//
// Why: the panel path first gathers every patch into a patch matrix (a 4 x 4 transpose per channel,
// row and 16 tokens) and then multiplies it; at resnet152-b1 batch 64 the gather took more cycles
// than the GEMM after it (4.9M vs 3.8M per worker). Here the GEMM's B operand is the image row
// itself: one zmm holds 16 consecutive pixels of a row = 16/pw patches x pw pixels, and the weight
// operand is the pw weights of (output e, channel c, patch row i) repeated across the register
// (a 128-bit broadcast for pw = 4). Each lane then accumulates, over c and i, the products of one
// (patch, pixel column j); after the K loop the pw lanes of a patch are summed, giving 16/pw
// outputs per register. Every lane does useful work except past the row's end (28-pixel rows:
// 28 of 32 lanes), and x is read straight from its NCHW planes while the FMAs run.
//
// The weight is used in (e, c, i, j) order, pw consecutive floats per (e, c, i); PyTorch stores the
// embedding's weight as (e, (i, j, c)) (the reference's patch order), so each call repacks it
// (pack_patch_weight; d*P floats, a transpose per output row) - nothing is cached across calls. A team's
// one-sample call packs inside embed_rows_avx512 instead, one row block at a time (PackSource).
//
// Like fused_avx512.cpp: compiled for AVX-512F/DQ/BW/VL, entered only after the run-time check, no
// std:: templates, internal linkage except the two entry points.
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "fused_tiles.h"

#include <immintrin.h>

namespace slvit_fused {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The PW weights at w repeated across the 16 lanes.
template <int PW>
inline __m512 repeat_weights(const float* w) {
  if constexpr (PW == 2) return _mm512_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd((const double*)w)));
  if constexpr (PW == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(w));
  if constexpr (PW == 8) return _mm512_broadcast_f32x8(_mm256_loadu_ps(w));
  return _mm512_loadu_ps(w);
}

// Every lane: the sum of its group of PW adjacent lanes ((l0 + l1) + (l2 + l3) for PW = 4).
template <int PW>
inline __m512 group_sum(__m512 a) {
  a = _mm512_add_ps(a, _mm512_permute_ps(a, 0xB1));  // lane ^ 1
  if constexpr (PW >= 4) a = _mm512_add_ps(a, _mm512_permute_ps(a, 0x4E));  // lane ^ 2
  if constexpr (PW >= 8) a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, 0xB1));  // lane ^ 4
  if constexpr (PW >= 16) a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, 0x4E));  // lane ^ 8
  return a;
}

// Lanes 0, PW, 2 PW, ...: the first lane of every group.
template <int PW>
constexpr __mmask16 group_heads() {
  unsigned m = 0;
  for (int l = 0; l < 16; l += PW) m |= 1u << l;
  return (__mmask16)m;
}

struct Rows {
  const float* x;    // pixel px0 of image row gy*ph of channel 0 of the tile's channel range
  int64_t sc, sh;    // channel plane and image row strides (floats)
  int64_t nc, ph;    // channels and patch rows summed
  const float* w;    // packed weight of row e0, channel 0 of the range: (c*ph + i)*PW + j
  int64_t ldw;       // packed weight row stride
  __mmask16 m0, m1;  // valid lanes of the two pixel vectors
  bool ahead;        // fetch channel c + kAhead's rows (first row block of a grid row only)
};

// Channel planes are H*W*4 bytes apart, a new page per channel that the hardware prefetchers do not
// follow: the rows of a channel a few planes ahead are requested early (as the panel gather does).
constexpr int64_t kAhead = 4;

// acc += the products of channels [c_lo, c_hi) (all ph patch rows), MR output rows x 2 pixel vectors.
// The weight rows are addressed in groups of 4 from one pointer ([g], [g + ldw], [g + 2 ldw],
// [g + 3 ldw] are base + index*scale forms): a pointer per row chains a dozen adds per k step.
template <int PW, int MR>
__attribute__((always_inline)) inline void k_loop(const Rows& r, int64_t c_lo, int64_t c_hi, __m512 (&acc)[MR][2]) {
  const int64_t ldw = r.ldw;
  const float* w = r.w + c_lo * r.ph * PW;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    if (r.ahead && c + kAhead < r.nc) {
      const float* q = r.x + (c + kAhead) * r.sc;
      for (int64_t i = 0; i < r.ph; ++i) {  // the row's first and last pixel of these 32 (2-3 lines)
        _mm_prefetch((const char*)(q + i * r.sh), _MM_HINT_T0);
        _mm_prefetch((const char*)(q + i * r.sh + 16), _MM_HINT_T0);
        _mm_prefetch((const char*)(q + i * r.sh + 31), _MM_HINT_T0);
      }
    }
    const float* xr = r.x + c * r.sc;
    for (int64_t i = 0; i < r.ph; ++i, xr += r.sh, w += PW) {
      const __m512 x0 = _mm512_maskz_loadu_ps(r.m0, xr);
      const __m512 x1 = _mm512_maskz_loadu_ps(r.m1, xr + 16);
      const float* g[(MR + 3) / 4];
#pragma GCC unroll 3
      for (int k = 0; k < (MR + 3) / 4; ++k) g[k] = w + 4 * k * ldw;
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const float* gm = g[m / 4];
        const float* wm = (m % 4 == 0) ? gm : (m % 4 == 1) ? gm + ldw : (m % 4 == 2) ? gm + 2 * ldw : gm + 3 * ldw;
        const __m512 wv = repeat_weights<PW>(wm);
        acc[m][0] = _mm512_fmadd_ps(wv, x0, acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(wv, x1, acc[m][1]);
      }
    }
  }
}

// MR output rows (e0 ..) x the patches of 32 pixels of one grid row, over channels [0, r.nc). out / add
// point at the first of those patches' columns in row e0; ntok0 / ntok1 patches come from the first /
// second pixel vector. acc_out: add to what out holds (a later block of channels; add / bias are then
// nullptr, they went in with the first).
template <int PW, int MR>
void tile(const Rows& r, float* out, int64_t ldo, const float* add, int64_t ld_add, const float* bias, int ntok0,
          int ntok1, bool acc_out) {
  __m512 acc[MR][2];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  k_loop<PW, MR>(r, 0, r.nc, acc);
  constexpr __mmask16 heads = group_heads<PW>();
  const __mmask16 t0 = (__mmask16)((1u << ntok0) - 1u), t1 = (__mmask16)((1u << ntok1) - 1u);
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    // the patch sums, packed into the low lanes, one vector per pixel vector
    __m512 s0 = _mm512_maskz_compress_ps(heads, group_sum<PW>(acc[m][0]));
    __m512 s1 = _mm512_maskz_compress_ps(heads, group_sum<PW>(acc[m][1]));
    if (bias) {
      const __m512 b = _mm512_set1_ps(bias[m]);
      s0 = _mm512_add_ps(s0, b);
      s1 = _mm512_add_ps(s1, b);
    }
    float* o = out + m * ldo;
    if (acc_out) {
      s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(t0, o));
      s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(t1, o + ntok0));
    }
    if (add) {
      const float* a = add + m * ld_add;
      s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(t0, a));
      s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(t1, a + ntok0));
    }
    _mm512_mask_storeu_ps(o, t0, s0);
    _mm512_mask_storeu_ps(o + ntok0, t1, s1);
  }
}

typedef void (*tile_fn)(const Rows&, float*, int64_t, const float*, int64_t, const float*, int, int, bool);

template <int PW>
tile_fn pick(int mr) {
  switch (mr) {
    case 1: return tile<PW, 1>;
    case 2: return tile<PW, 2>;
    case 3: return tile<PW, 3>;
    case 4: return tile<PW, 4>;
    case 5: return tile<PW, 5>;
    case 6: return tile<PW, 6>;
    case 7: return tile<PW, 7>;
    case 8: return tile<PW, 8>;
    case 9: return tile<PW, 9>;
    case 10: return tile<PW, 10>;
    case 11: return tile<PW, 11>;
    default: return tile<PW, 12>;
  }
}

tile_fn pick_tile(int64_t pw, int mr) {
  switch (pw) {
    case 2: return pick<2>(mr);
    case 4: return pick<4>(mr);
    default: return pick<8>(mr);
  }
}

// out[j*ldo + i] = in[i*ldi + j] for i, j < 16: unpack 32-bit and 64-bit pairs inside 128-bit lanes,
// then two rounds of 128-bit lane shuffles.
inline void transpose16(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + k], 128-bit lane L: rows 4g .. 4g + 3 of column 4L + k
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), e = _mm512_castps_pd(t[g + 3]);
    r[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), w = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), w2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    _mm512_storeu_ps(out + k * ldo, _mm512_shuffle_f32x4(v, v2, 0x88));
    _mm512_storeu_ps(out + (8 + k) * ldo, _mm512_shuffle_f32x4(v, v2, 0xDD));
    _mm512_storeu_ps(out + (4 + k) * ldo, _mm512_shuffle_f32x4(w, w2, 0x88));
    _mm512_storeu_ps(out + (12 + k) * ldo, _mm512_shuffle_f32x4(w, w2, 0xDD));
  }
}

constexpr int kMaxRows = 12;  // 12 rows x 2 vectors = 24 accumulators (of 32 zmm)

}  // namespace

// Where the direct kernel is faster than gathering panels (measured in review, 1 thread, gather +
// embedding cycles): pw = 16 gives each 64-byte weight vector only 2 FMAs (L2-bandwidth bound: 5.1M vs
// 3.0M cycles for panels at 32x128, C = 64) and rows of <= 16 pixels leave the second pixel vector
// empty (its FMAs still run: 2.5M vs 1.75M at 16x16, C = 256).
bool embed_rows_wanted(int64_t pw, int64_t row_pixels) { return (pw == 2 || pw == 4 || pw == 8) && row_pixels > 16; }

// Rows [0, rows) of Wp, channels [c0, c1), into dst: row e at dst + e * ld_dst, channel c's ph*pw weights
// at (c - dst_c0) * ph * pw (pack_patch_weight: ld_dst = P, dst_c0 = 0).
static void pack_rows(const float* Wp, int64_t rows, int64_t C, int64_t ph, int64_t pw, int64_t c0, int64_t c1,
                      float* dst_base, int64_t ld_dst, int64_t dst_c0) {
  const int64_t pp = ph * pw, P = pp * C;
  // per output row a (pp x C) -> (C x pp) transpose: 16 x 16 register transposes where pp is a
  // multiple of 16 (4 x 4 patches and up), scalar for the rest
  for (int64_t e = 0; e < rows; ++e) {
    const float* src = Wp + e * P;
    float* dst = dst_base + e * ld_dst - dst_c0 * pp;
    int64_t cv = c0;
    if (pp % 16 == 0)
      for (; cv + 16 <= c1; cv += 16)
        for (int64_t q0 = 0; q0 < pp; q0 += 16) transpose16(src + q0 * C + cv, C, dst + cv * pp + q0, pp);
    for (int64_t q = 0; q < pp; ++q)
      for (int64_t c = cv; c < c1; ++c) dst[c * pp + q] = src[q * C + c];
  }
}

void pack_patch_weight(const float* Wp, int64_t d, int64_t C, int64_t ph, int64_t pw, int64_t c0, int64_t c1,
                       float* Wk) {
  pack_rows(Wp, d, C, ph, pw, c0, c1, Wk, ph * pw * C, 0);
}

// embed_rows_avx512 with pack (one channel block): row blocks outermost, each block's weight rows packed
// just before its tiles - into pack.block, one block's rows rewritten per block, or else into their place in
// Wk_all. Why: at batch 1 the whole packed weight (128 KB per worker for resnet152-b1) was written cold on
// every call - its lines evicted by the rest of the call since the last one - and the repack cost 52-59k
// cycles per worker; into a block buffer that stays in L1/L2 the repack and the embedding together take
// 95-113k instead of 133-151k (2 threads, interleaved runs; prefetching the next block's weight rows into L2
// during the current block's tiles changed nothing measurable and is not done). Each tile is the one the loop
// in embed_rows_avx512 would run (same k order), so the results are its bits.
static void embed_rows_packing(Rows& r, int64_t px, int64_t gh, int64_t gw, int64_t ph, int64_t pw, int64_t d,
                               int64_t nblk, const float* x, float* out, int64_t ldo, const float* add,
                               int64_t ld_add, const float* bias, const PackSource& pk) {
  const int64_t pp = ph * pw, P = pp * pk.C, nc = pk.c1 - pk.c0;
  const float* Wk = r.w;  // with no block buffer: this channel range's packed rows, row e at Wk + e * ldw
  r.nc = nc;
  if (pk.block) r.ldw = nc * pp;
  for (int64_t b = 0, e0 = 0; b < nblk; ++b) {
    const int64_t e1 = d * (b + 1) / nblk;  // the balanced row blocks of embed_rows_avx512
    if (pk.block) {
      pack_rows(pk.Wp + e0 * P, e1 - e0, pk.C, ph, pw, pk.c0, pk.c1, pk.block, nc * pp, pk.c0);
      r.w = pk.block;
    } else {
      pack_rows(pk.Wp + e0 * P, e1 - e0, pk.C, ph, pw, pk.c0, pk.c1, pk.Wk_all + e0 * P, P, 0);
      r.w = Wk + e0 * r.ldw;
    }
    r.ahead = b == 0;
    for (int64_t gy = 0; gy < gh; ++gy) {
      for (int64_t p0 = 0; p0 < px; p0 += 32) {
        const int64_t n0 = imin(16, px - p0), n1 = px - p0 > 16 ? imin(16, px - p0 - 16) : 0;
        r.x = x + gy * ph * r.sh + p0;
        r.m0 = (__mmask16)((1u << n0) - 1u);
        r.m1 = (__mmask16)((1u << n1) - 1u);
        const int ntok0 = (int)(n0 / pw), ntok1 = (int)(n1 / pw);
        const int64_t col = gy * gw + p0 / pw;
        pick_tile(pw, (int)(e1 - e0))(r, out + e0 * ldo + col, ldo, add ? add + e0 * ld_add + col : nullptr, ld_add,
                                      bias ? bias + e0 : nullptr, ntok0, ntok1, false);
      }
    }
    e0 = e1;
  }
}

void embed_rows_avx512(const float* x, int64_t sc, int64_t sh, int64_t nc, int64_t ph, int64_t pw, int64_t gh,
                       int64_t gw, const float* Wk, int64_t ldw, int64_t d, float* out, int64_t ldo, const float* add,
                       int64_t ld_add, const float* bias, const PackSource* pack) {
  const int64_t px = gw * pw;
  const int64_t nblk = (d + kMaxRows - 1) / kMaxRows;
  Rows r;
  r.sc = sc;
  r.sh = sh;
  r.ph = ph;
  r.ldw = ldw;
  // Channels in blocks of ~kKBlock k steps, outermost: a block's slice of the weight is reused by every
  // tile of the sample while it is in cache (per tile, a weight larger than L2 - audiocsrnet's 4 MB -
  // was streamed again for every 32 pixels: 1.7x slower than the panels there), and each block's sums
  // are added into out (the blocked float32 sum of fused_tiles.h's Shape::k_block).
  const int64_t cb = ph >= kKBlock ? 1 : kKBlock / ph;
  if (pack) {
    if (nc <= cb) {  // one channel block: pack row block by row block (the usual case: a team's K share)
      r.w = Wk;
      embed_rows_packing(r, px, gh, gw, ph, pw, d, nblk, x, out, ldo, add, ld_add, bias, *pack);
      return;
    }
    pack_patch_weight(pack->Wp, d, pack->C, ph, pw, pack->c0, pack->c1, pack->Wk_all);
  }
  for (int64_t k0 = 0; k0 < nc; k0 += cb) {
    r.nc = imin(cb, nc - k0);
    const bool acc_out = k0 > 0;
    for (int64_t gy = 0; gy < gh; ++gy) {
      for (int64_t p0 = 0; p0 < px; p0 += 32) {
        const int64_t n0 = imin(16, px - p0), n1 = px - p0 > 16 ? imin(16, px - p0 - 16) : 0;
        r.x = x + k0 * sc + gy * ph * sh + p0;
        r.m0 = (__mmask16)((1u << n0) - 1u);
        r.m1 = (__mmask16)((1u << n1) - 1u);
        const int ntok0 = (int)(n0 / pw), ntok1 = (int)(n1 / pw);
        const int64_t col = gy * gw + p0 / pw;
        // row blocks of balanced heights (32 rows: 10, 11, 11)
        for (int64_t b = 0, e0 = 0; b < nblk; ++b) {
          const int64_t e1 = d * (b + 1) / nblk;
          r.w = Wk + e0 * ldw + k0 * ph * pw;
          r.ahead = b == 0;
          pick_tile(pw, (int)(e1 - e0))(r, out + e0 * ldo + col, ldo,
                                        add && !acc_out ? add + e0 * ld_add + col : nullptr, ld_add,
                                        bias && !acc_out ? bias + e0 : nullptr, ntok0, ntok1, acc_out);
          e0 = e1;
        }
      }
    }
  }
}

}  // namespace slvit_fused
