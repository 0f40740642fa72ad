// Vector patch gather / scatter of the training path. API and layouts: patch_rows.h.
//
// Compiled for AVX2+FMA (the pragma below) and only entered after slvit_fused::cpu_supported() said yes.
// Like fused_avx2.cpp it uses no std:: templates (an inline function instantiated here with AVX2 code
// could be picked by the linker for the rest of the library); everything but the API has internal
// linkage.
//
// Why it is faster than the scalar loops it replaces (slvit_cpu.cpp, kept as the fallback): the paper's
// 4x4 patches of an NCHW map make the channel-major row of a patch, per channel, ph runs of 4 pixels
// from ph consecutive image rows = 16 floats = one 64-byte line of the patch row. The kernel assembles
// that line from the 4 rows in two 32-byte registers (two 16-byte loads each) and writes it with two
// stores, instead of 4 separate 16-byte copies into lines 8 KiB apart; the other pw / ph values copy
// each pw-pixel run with full and masked 8-float moves. AVX-512 would not help: the loop is bound by
// loads/stores and memory, not by vector width.
#pragma GCC target("avx2,fma")

#include "patch_rows.h"

#include <immintrin.h>

namespace slvit_patch {
namespace {

inline __m256i tail_mask(int64_t n) {  // first n lanes on (0 <= n <= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Copy n contiguous floats s -> d (no overlap).
inline void copy_run(const float* s, float* d, int64_t n) {
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    const __m256 a = _mm256_loadu_ps(s + k), b = _mm256_loadu_ps(s + k + 8);
    const __m256 c = _mm256_loadu_ps(s + k + 16), e = _mm256_loadu_ps(s + k + 24);
    _mm256_storeu_ps(d + k, a);
    _mm256_storeu_ps(d + k + 8, b);
    _mm256_storeu_ps(d + k + 16, c);
    _mm256_storeu_ps(d + k + 24, e);
  }
  for (; k + 8 <= n; k += 8) _mm256_storeu_ps(d + k, _mm256_loadu_ps(s + k));
  if (k < n) {
    const __m256i m = tail_mask(n - k);
    _mm256_maskstore_ps(d + k, m, _mm256_maskload_ps(s + k, m));
  }
}

// The image rows of channel plane `ch` of one (sample, grid row) are fetched a few planes ahead: planes
// are H*W*4 bytes apart, a new page per channel that the hardware prefetchers do not follow. For the
// scatter this brings dx's lines in before they are written (a write to an absent line waits for it).
constexpr int64_t kAhead = 4;

inline void prefetch_rows(const float* r, int64_t nrows, int64_t sh, int64_t row_bytes) {
  for (int64_t i = 0; i < nrows; ++i) {
    const char* q = (const char*)(r + i * sh);
    for (int64_t o = 0; o < row_bytes; o += 64) _mm_prefetch(q + o, _MM_HINT_T0);
  }
}

// kChannelMajor, unit W stride. pm row (b, gy, gx) = [ch][i][j]: x[b, ch, gy*ph + i, gx*pw + j].
template <bool kScatter>
void channel_major(float* x, const Geom& g, float* pm, int64_t lo, int64_t hi) {
  const int64_t gh = g.H / g.ph, gw = g.W / g.pw, P = g.C * g.ph * g.pw, ph = g.ph, pw = g.pw, sh = g.sh;
  const int64_t row_bytes = g.W * 4;
  const bool ahead = row_bytes <= 4096 && g.sc != 0;
  for (int64_t bg = lo; bg < hi; ++bg) {
    const int64_t b = bg / gh, gy = bg % gh;
    float* rowbase = pm + (b * gh * gw + gy * gw) * P;
    float* xb = x + b * g.sb + gy * ph * sh;
    for (int64_t ch = 0; ch < g.C; ++ch) {
      if (ahead && ch + kAhead < g.C) prefetch_rows(xb + (ch + kAhead) * g.sc, ph, sh, row_bytes);
      float* xc = xb + ch * g.sc;
      float* dc = rowbase + ch * ph * pw;
      if (pw == 4) {
        // per patch: ph runs of 4 floats -> 4*ph contiguous floats; two rows per 32-byte register
        for (int64_t gx = 0; gx < gw; ++gx) {
          float* d = dc + gx * P;
          float* s = xc + gx * 4;
          int64_t i = 0;
          for (; i + 2 <= ph; i += 2) {
            float* s0 = s + i * sh;
            float* s1 = s0 + sh;
            if (kScatter) {
              const __m256 v = _mm256_loadu_ps(d + i * 4);
              _mm_storeu_ps(s0, _mm256_castps256_ps128(v));
              _mm_storeu_ps(s1, _mm256_extractf128_ps(v, 1));
            } else {
              const __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(s0)), _mm_loadu_ps(s1), 1);
              _mm256_storeu_ps(d + i * 4, v);
            }
          }
          if (i < ph) {
            if (kScatter) _mm_storeu_ps(s + i * sh, _mm_loadu_ps(d + i * 4));
            else _mm_storeu_ps(d + i * 4, _mm_loadu_ps(s + i * sh));
          }
        }
      } else {
        for (int64_t gx = 0; gx < gw; ++gx)
          for (int64_t i = 0; i < ph; ++i) {
            float* d = dc + gx * P + i * pw;
            float* s = xc + i * sh + gx * pw;
            if (kScatter) copy_run(d, s, pw); else copy_run(s, d, pw);
          }
      }
    }
  }
}

// kPixelMajor, unit C stride. pm row (b, gy, gx) = [i][j][ch]: x[b, ch, gy*ph + i, gx*pw + j]. When the
// pixels of a patch row are adjacent in memory (W stride == C), the pw runs of C channels are one run.
template <bool kScatter>
void pixel_major(float* x, const Geom& g, float* pm, int64_t lo, int64_t hi) {
  const int64_t gh = g.H / g.ph, gw = g.W / g.pw, P = g.C * g.ph * g.pw, ph = g.ph, pw = g.pw, C = g.C;
  const bool packed = g.sw == C;
  for (int64_t bg = lo; bg < hi; ++bg) {
    const int64_t b = bg / gh, gy = bg % gh;
    float* rowbase = pm + (b * gh * gw + gy * gw) * P;
    for (int64_t i = 0; i < ph; ++i) {
      float* xr = x + b * g.sb + (gy * ph + i) * g.sh;
      for (int64_t gx = 0; gx < gw; ++gx) {
        float* d = rowbase + gx * P + i * pw * C;
        float* s = xr + gx * pw * g.sw;
        if (packed) {
          if (kScatter) copy_run(d, s, pw * C); else copy_run(s, d, pw * C);
          continue;
        }
        for (int64_t j = 0; j < pw; ++j) {
          if (kScatter) copy_run(d + j * C, s + j * g.sw, C); else copy_run(s + j * g.sw, d + j * C, C);
        }
      }
    }
  }
}

}  // namespace

bool rows_vectorized(const Geom& g, Order o) {
  if (g.C <= 0 || g.ph <= 0 || g.pw <= 0 || g.H % g.ph != 0 || g.W % g.pw != 0) return false;
  return o == kChannelMajor ? g.sw == 1 : g.sc == 1;
}

void gather_rows(const float* x, const Geom& g, Order o, float* pm, int64_t bg_lo, int64_t bg_hi) {
  float* xm = const_cast<float*>(x);  // read only: the kernels are shared with the scatter
  if (o == kChannelMajor) channel_major<false>(xm, g, pm, bg_lo, bg_hi);
  else pixel_major<false>(xm, g, pm, bg_lo, bg_hi);
}

void scatter_rows(const float* pm, const Geom& g, Order o, float* x, int64_t bg_lo, int64_t bg_hi) {
  float* pmm = const_cast<float*>(pm);  // read only
  if (o == kChannelMajor) channel_major<true>(x, g, pmm, bg_lo, bg_hi);
  else pixel_major<true>(x, g, pmm, bg_lo, bg_hi);
}

}  // namespace slvit_patch
