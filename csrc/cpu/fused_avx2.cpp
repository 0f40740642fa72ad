// Fused AVX2/FMA inference forward of the SL-ViT exit. API and layout: fused_avx2.h.
//
// This translation unit is compiled for AVX2+FMA (the pragma below) and is only entered after
// cpu_supported() said yes. It deliberately uses no std:: templates: an inline function instantiated
// here with AVX2 code could be picked by the linker for the rest of the library too.
#pragma GCC target("avx2,fma")

#include "fused_avx2.h"
#include "fused_tiles.h"

#include <immintrin.h>
#include <x86intrin.h>
#include <sched.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

namespace slvit_fused {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Vector math. exp: Cephes-style range reduction + degree-5 polynomial (~1 ulp). erf: Abramowitz &
// Stegun 7.1.26 (|error| < 1.5e-7), the same formula ATen's vectorized CPU erf uses, so GELU agrees
// with eager PyTorch to float32 rounding. Constant first in min/max: a NaN input stays NaN.
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

// erf: odd/even rational minimax approximation on [-4, 4] (the one Eigen and XLA use for float;
// max |error| 6.5e-8 over [-6, 6], checked against math.erf). No exp and a single divide: GELU was
// ~12% of the exit's time with the exp-based formula.
inline __m256 erf_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(4.f), x);  // constant first: NaN stays NaN
  x = _mm256_max_ps(_mm256_set1_ps(-4.f), x);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 num = _mm256_set1_ps(-2.72614225801306e-10f);
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(2.77068142495902e-08f));
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  num = _mm256_fmadd_ps(num, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  __m256 den = _mm256_set1_ps(-1.45660718464996e-05f);
  den = _mm256_fmadd_ps(den, x2, _mm256_set1_ps(-2.13374055278905e-04f));
  den = _mm256_fmadd_ps(den, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  den = _mm256_fmadd_ps(den, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  den = _mm256_fmadd_ps(den, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(_mm256_mul_ps(x, num), den);
}

inline __m256 gelu_ps(__m256 x) {
  __m256 c = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), c));
}

inline __m256 relu_ps(__m256 x) {
  // max(x, 0) that keeps NaN (constant first)
  return _mm256_max_ps(_mm256_setzero_ps(), x);
}

inline __m256 apply_act(__m256 x, int act) {
  return act == kGelu ? gelu_ps(x) : act == kRelu ? relu_ps(x) : x;
}

inline __m256i tail_mask(int n) {  // first n lanes on (0 <= n <= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------------------------------------
// GEMM (Epi, Shape: fused_tiles.h): C[r][c] = act(alpha * sum_k A[r][k] B[k][c] + row_bias[r] + add[r][c]).
// AVX2 micro-tile: MR rows x 8*NV columns, MR*NV <= 12 accumulators; columns past `nvalid` are neither
// loaded from `add` nor stored. B is read up to the 8*NV boundary (buffers carry column padding) unless
// MASKB (Shape::b_masked_tail on a partial last block): then its last vector is a masked load.

// n k steps of the tile into acc (a, b advance past them).
template <int MR, int NV, bool MASKB>
__attribute__((always_inline)) inline void tile_k_steps(__m256 (&acc)[MR][NV], const float*& a, const float*& b,
                                                        int64_t n, int64_t a_rs, int64_t a_ks, int64_t ldb,
                                                        __m256i bmask) {
  for (int64_t k = 0; k < n; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      bv[v] = (MASKB && v == NV - 1) ? _mm256_maskload_ps(b + 8 * v, bmask) : _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * a_rs);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += a_ks;
    b += ldb;
  }
}

template <int MR, int NV, bool MASKB>
void micro_tile(const Shape& sh, const float* A, const float* Bm, float* C, const float* rbias, const float* add,
                int64_t ld_add, float alpha, int act, int nvalid, const float* cscale) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  const int64_t K = sh.K, a_rs = sh.a_rs, a_ks = sh.a_ks, ldb = sh.ldb;
  const __m256i bmask = tail_mask(MASKB ? nvalid - 8 * (NV - 1) : 8);
  const int64_t kb = sh.k_block > 0 ? sh.k_block : sh.k_block < 0 ? INT64_MAX : kKBlock;
  if (K * sh.nseg <= kb) {  // short K (most GEMMs): one in-order pass, no partial buffer
    for (int64_t seg = 0; seg < sh.nseg; ++seg) {
      const float* a = A + seg * sh.a_seg;
      const float* b = Bm + seg * sh.b_seg;
      tile_k_steps<MR, NV, MASKB>(acc, a, b, K, a_rs, a_ks, ldb, bmask);
    }
  } else {
    // blocks of kb k steps across segments; each full block's sums go into `part` (Shape::k_block)
    __m256 part[MR][NV];
    bool have = false;
    int64_t room = kb, left = K * sh.nseg;
    for (int64_t seg = 0; seg < sh.nseg; ++seg) {
      const float* a = A + seg * sh.a_seg;
      const float* b = Bm + seg * sh.b_seg;
      for (int64_t k = 0; k < K;) {
        const int64_t n = imin(K - k, room);
        tile_k_steps<MR, NV, MASKB>(acc, a, b, n, a_rs, a_ks, ldb, bmask);
        k += n;
        room -= n;
        left -= n;
        if (room == 0 && left > 0) {
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
            for (int v = 0; v < NV; ++v) {
              part[r][v] = have ? _mm256_add_ps(part[r][v], acc[r][v]) : acc[r][v];
              acc[r][v] = _mm256_setzero_ps();
            }
          have = true;
          room = kb;
        }
      }
    }
    if (have)
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_add_ps(part[r][v], acc[r][v]);
  }
  const int64_t ldc = sh.ldc;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const int nv = nvalid - 8 * v;
      if (nv <= 0) continue;
      __m256 x = acc[r][v];
      if (alpha != 1.f) x = _mm256_mul_ps(x, _mm256_set1_ps(alpha));
      if (cscale)
        x = _mm256_mul_ps(x, (MASKB && v == NV - 1) ? _mm256_maskload_ps(cscale + 8 * v, bmask)
                                                    : _mm256_loadu_ps(cscale + 8 * v));
      if (rbias) x = _mm256_add_ps(x, _mm256_broadcast_ss(rbias + r));
      float* cp = C + r * ldc + 8 * v;
      if (nv >= 8) {
        if (add) x = _mm256_add_ps(x, _mm256_loadu_ps(add + r * ld_add + 8 * v));
        _mm256_storeu_ps(cp, apply_act(x, act));
      } else {
        const __m256i m = tail_mask(nv);
        if (add) x = _mm256_add_ps(x, _mm256_maskload_ps(add + r * ld_add + 8 * v, m));
        _mm256_maskstore_ps(cp, m, apply_act(x, act));
      }
    }
  }
}

typedef void (*tile_fn)(const Shape&, const float*, const float*, float*, const float*, const float*, int64_t, float,
                        int, int, const float*);

constexpr int kMR = 6;

// masked: B's last vector loaded with the tail mask (Shape::b_masked_tail and a partial block)
tile_fn pick_tile(int mr, int nv, bool masked) {
  static const tile_fn table[2][kMR][2] = {
      {{micro_tile<1, 1, false>, micro_tile<1, 2, false>}, {micro_tile<2, 1, false>, micro_tile<2, 2, false>},
       {micro_tile<3, 1, false>, micro_tile<3, 2, false>}, {micro_tile<4, 1, false>, micro_tile<4, 2, false>},
       {micro_tile<5, 1, false>, micro_tile<5, 2, false>}, {micro_tile<6, 1, false>, micro_tile<6, 2, false>}},
      {{micro_tile<1, 1, true>, micro_tile<1, 2, true>}, {micro_tile<2, 1, true>, micro_tile<2, 2, true>},
       {micro_tile<3, 1, true>, micro_tile<3, 2, true>}, {micro_tile<4, 1, true>, micro_tile<4, 2, true>},
       {micro_tile<5, 1, true>, micro_tile<5, 2, true>}, {micro_tile<6, 1, true>, micro_tile<6, 2, true>}}};
  return table[masked ? 1 : 0][mr - 1][nv - 1];
}

// Instruction set of the GEMMs on this thread: run() sets Problem::isa for its duration (and puts
// the previous value back), so the training path's callers of gemm() always get the AVX2 tiles.
thread_local int t_isa = kIsaAvx2;

// Rows [r0, r1) of C, columns [0, ncols). Column blocks outer: the B block (K x 16) stays in cache
// while every row block of the weights streams past it. B is either row-major (b_blk = 0) or stored
// as 16-column panels b_blk floats apart (ldb = 16): the gathered patch matrix.
//
// t_kblock: SLVIT_FAST_CPU_TEST_KBLOCK for this run() (a measuring/test knob, read per call by run():
// the Shape::k_block of every GEMM that leaves it 0; unset = 0 = kKBlock, -1 = unblocked).
thread_local int64_t t_kblock = 0;

void gemm_sh(int64_t r0, int64_t r1, int64_t ncols, const Shape& sh_in, const float* A, const float* Bm, float* C,
             const Epi& e, int64_t b_blk = 0) {
  Shape sh = sh_in;
  if (sh.k_block == 0) sh.k_block = t_kblock;
  if (t_isa == kIsaAvx512) {
    gemm_sh_avx512(r0, r1, ncols, sh, A, Bm, C, e, b_blk);
    return;
  }
  for (int64_t c = 0; c < ncols; c += 16) {
    const int nvalid = (int)imin(16, ncols - c);
    const int nv = nvalid > 8 ? 2 : 1;
    const bool masked = sh.b_masked_tail && nvalid < 8 * nv;
    const float* bc = b_blk ? Bm + (c / 16) * b_blk : Bm + c;
    for (int64_t r = r0; r < r1; r += kMR) {
      const int mr = (int)imin(kMR, r1 - r);
      pick_tile(mr, nv, masked)(sh, A + r * sh.a_rs, bc, C + r * sh.ldc + c, e.row_bias ? e.row_bias + r : nullptr,
                        e.add ? e.add + r * e.ld_add + c : nullptr, e.ld_add, e.alpha, e.act, nvalid,
                        e.col_scale ? e.col_scale + c : nullptr);
    }
  }
}

void gemm(int64_t r0, int64_t r1, int64_t ncols, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
          const float* Bm, int64_t ldb, float* C, int64_t ldc, const Epi& e) {
  Shape sh;
  sh.K = K; sh.a_rs = a_rs; sh.a_ks = a_ks; sh.ldb = ldb; sh.ldc = ldc;
  gemm_sh(r0, r1, ncols, sh, A, Bm, C, e);
}

float dot(const float* a, const float* b, int64_t K) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
  }
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

float act_scalar(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
  if (act == kRelu) return x > 0.f ? x : (x == x ? 0.f : x);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Team of workers: a worker range [w0, w1) of n runs on this thread; sync() is a barrier across
// all n (this thread arrives once per worker it holds, so any grouping of workers is deadlock-free).
void barrier_wait(Barrier* b, int arrivals) {
  const int g = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
  if (__atomic_add_fetch(&b->count, arrivals, __ATOMIC_ACQ_REL) == b->total) {
    __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&b->gen, g + 1, __ATOMIC_RELEASE);
    return;
  }
  int spins = 0;
  while (__atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == g) {
    _mm_pause();
    if (++spins == 2048) {  // the other worker is descheduled: stop burning its core
      sched_yield();
      spins = 0;
    }
  }
}

struct Team {
  int w0, w1, n;
  Barrier* bar;
  void sync() const {
    if (n > 1) barrier_wait(bar, w1 - w0);
  }
  // [lo, hi) of `count` items for worker w
  static void share(int64_t count, int w, int n, int64_t& lo, int64_t& hi) {
    lo = count * w / n;
    hi = count * (w + 1) / n;
  }
};

// Profiling (set_profiling): cycles since the previous mark go to `ph`, on worker 0's thread only.
bool g_prof = false;
thread_local double t_prof[kNumPhases];
thread_local uint64_t t_last = 0;
inline void mark(const Team& t, int ph) {
  if (!g_prof || t.w0 != 0) return;
  const uint64_t now = __rdtsc();
  t_prof[ph] += (double)(now - t_last);
  t_last = now;
}
// End of phase `ph`, then the barrier (its wait is counted as kPhBarrier).
inline void end_phase(const Team& t, int ph) {
  mark(t, ph);
  t.sync();
  mark(t, kPhBarrier);
}

// Rows [0, M) in whole micro-tile blocks per worker (a split inside a block wastes FMA lanes). The
// AVX-512 GEMM balances its own tile heights, so its step is finer (32 rows split 16/16, not 18/14).
// Worker w's rows [lo, hi) of M (may be empty).
inline void worker_rows(const Team& t, int64_t M, int w, int64_t& lo, int64_t& hi) {
  const int64_t step = t_isa == kIsaAvx512 ? kRowStep512 : kMR;
  const int64_t nblk = (M + step - 1) / step;
  Team::share(nblk, w, t.n, lo, hi);
  lo = imin(lo * step, M);
  hi = imin(hi * step, M);
}

template <class F>
void for_row_share(const Team& t, int64_t M, F f) {
  for (int w = t.w0; w < t.w1; ++w) {
    int64_t lo, hi;
    worker_rows(t, M, w, lo, hi);
    if (lo < hi) f(lo, hi);
  }
}

template <class F>
void for_share(const Team& t, int64_t count, F f) {
  for (int w = t.w0; w < t.w1; ++w) {
    int64_t lo, hi;
    Team::share(count, w, t.n, lo, hi);
    if (lo < hi) f(lo, hi);
  }
}

// ---------------------------------------------------------------------------------------------
// Workspace plan. Activations of a chunk of S samples: rows = features, columns = S*T tokens
// (sample-major), row length `ld` = S*T rounded up to 16 plus 16 spare columns, because attention
// reads query columns up to round8(T) past any sample's first token (results past T are discarded).
struct Plan {
  bool team;        // all workers share one chunk (small batch) instead of owning samples
  bool head_gemm;   // head as a GEMM over a feature-major flat batch (else per-sample dot products)
  int64_t S, cols, ncomp, ld, ldS, ldf;
  int64_t pt_floats, n_set, n_scratch, n_flat, n_hid, n_outT;
  bool fold;        // team with LayerNorm folded into the next GEMM (its y in the worker's n_ypriv buffer)
  int64_t n_ypriv;
  bool direct;      // patch embedding from the image rows (embed_rows_avx512), weight repacked into n_wk
  int64_t n_wk;
};

Plan make_plan(const Problem& p, int nw) {
  Plan pl;
  pl.team = nw > 1 && p.B * p.T <= 256;
  // ~200 tokens per owned chunk (4 samples at T = 49): measured interleaved on the Xeon, resnet152-b1
  // batch 64, 2 threads, 12 rounds: 128 tokens 11.4 ms, 196 10.7, 256 10.7, 400 11.5 (AVX-512; AVX2
  // 14.8 / 14.3 / 14.3 / 14.6): fewer, fuller column blocks while the chunk's activations stay in L2.
  constexpr int64_t kChunkTokens = 200;
  pl.S = pl.team ? p.B : (p.T >= kChunkTokens ? 1 : imin(p.B, kChunkTokens / p.T));
  if (pl.S < 1) pl.S = 1;
  pl.cols = pl.S * p.T;
  pl.ncomp = round_up(pl.cols, 8);
  pl.ld = round_up(pl.cols, 16) + 16;
  // rows a multiple of 256 bytes apart fall into few cache sets: GEMM operand blocks are read row
  // by row down K, so keep the row pitch an odd multiple of 64 bytes
  if (pl.ld % 32 == 0) pl.ld += 16;
  pl.ldS = round_up(p.T, 16);
  pl.head_gemm = p.B >= 4;
  pl.ldf = round_up(p.B, 16) + 16;
  // a team gathers every 16-token panel of its chunk up front; a single worker reuses two (one
  // 32-column GEMM block: the AVX-512 tiles are 2 zmm wide)
  const int64_t panels = pl.team ? (pl.ld + 15) / 16 : 2;
  pl.direct = p.embed_direct && p.isa == kIsaAvx512 && p.sw == 1 && embed_rows_wanted(p.pw, p.W);
  // (direct: no panels - an audiocsrnet team's were ~23 MB of workspace)
  pl.pt_floats = pl.direct ? 0 : round_up(panels * p.ph * p.pw * (p.C * 16 + 16), 16);
  pl.n_set = round_up(pl.pt_floats + (6 * p.d + 4 * p.A + p.mlp) * pl.ld, 16);
  pl.n_scratch = round_up((p.T + 1) * pl.ldS + 32, 16);  // score tile + 1/sum row + read-past slack
  const int64_t Td = p.T * p.d;
  pl.n_flat = round_up(pl.head_gemm ? Td * pl.ldf : p.B * Td, 16);
  pl.n_hid = round_up(pl.head_gemm ? p.hidden * pl.ldf : p.B * p.hidden, 16);
  pl.n_outT = round_up(p.outputs * pl.ldf, 16);
  pl.fold = pl.team && !p.legacy_phases;
  pl.n_ypriv = pl.team ? round_up(p.d * pl.ld, 16) : 0;  // embedding partials; the folded LN output
  pl.n_wk = pl.direct ? round_up(p.d * p.C * p.ph * p.pw, 16) : 0;
  return pl;
}

struct ChunkBufs {
  float *PT, *add, *tA, *tB, *y, *t1, *q, *k, *v, *o, *h;
  const float* wk = nullptr;  // Plan::direct: the repacked patch-embedding weight
  float* wk_unpacked = nullptr;  // team: wk not packed yet - each worker's first embedding call packs its
                                // channels (PackSource), hiding the weight's fetch behind its FMAs
};

ChunkBufs chunk_bufs(const Problem& p, const Plan& pl, float* base) {
  ChunkBufs c;
  const int64_t ld = pl.ld;
  float* q = base;
  c.PT = q; q += pl.pt_floats;
  c.add = q; q += p.d * ld;
  c.tA = q; q += p.d * ld;
  c.tB = q; q += p.d * ld;
  c.y = q; q += p.d * ld;
  c.t1 = q; q += p.d * ld;
  q += p.d * ld;  // spare (keeps the layout in step with n_set)
  c.q = q; q += p.A * ld;
  c.k = q; q += p.A * ld;
  c.v = q; q += p.A * ld;
  c.o = q; q += p.A * ld;
  c.h = q;
  return c;
}

// (bias + position embedding) in the chunk layout; extra-token and padding columns are zero.
void build_add(const Problem& p, const Plan& pl, float* add, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    float* row = add + n * pl.ld;
    for (int64_t c = 0; c < pl.ld; ++c) row[c] = 0.f;
    for (int64_t s = 0; s < pl.S; ++s)
      for (int64_t m = 0; m < p.Np; ++m) row[s * p.T + m] = p.bp[n] + p.pos[m * p.d + n];
  }
}

// Patch panel: the patch matrix (transposed) for the 16 token columns [tok0, tok0 + 16) of a chunk,
// stored as ph*pw segments (one per in-patch pixel (i, j)) of C rows x 16 floats:
//   panel[(i*pw + j)*seg + c*16 + t] = x[b, c, gy*ph + i, gx*pw + j]   for token t = (b, gy, gx)
// which is the column order of the PyTorch patch-embedding weight, so the weight is used as stored.
// seg = C*16 + 16 floats: segments a multiple of 4 KiB apart would put the 16 rows written per
// channel into one cache set. Channels outermost, so x is read plane by plane, in memory order.
// Extra-token and padding columns are zero. Channel range [c0, c1) per worker.
inline int64_t panel_seg(const Problem& p) { return p.C * 16 + 16; }
inline int64_t panel_floats(const Problem& p) { return p.ph * p.pw * panel_seg(p); }

void gather_panel(const Problem& p, int64_t b0, int64_t S, int64_t tok0, float* panel, int64_t c0, int64_t c1) {
  static const float zeros[16] = {0.f};
  const int64_t seg = panel_seg(p);
  // Any stride may be 0 (expanded inputs), so validity is its own flag, never inferred from strides.
  const float* src[16];       // token's (c = 0, i = 0, j = 0) pixel, or zeros
  const float* row0[16];      // token's first image row (gx = 0), for read-ahead
  bool valid[16];
  int64_t sc[16], sh[16];
  for (int t = 0; t < 16; ++t) {
    const int64_t tok = tok0 + t, s = tok / p.T, m = tok % p.T;
    valid[t] = s < S && m < p.Np;
    if (valid[t]) {
      const int64_t gy = m / p.gw, gx = m % p.gw;
      row0[t] = p.x + (b0 + s) * p.sb + gy * p.ph * p.sh;
      src[t] = row0[t] + gx * p.pw * p.sw;
      sc[t] = p.sc;
      sh[t] = p.sh;
    } else {
      src[t] = row0[t] = zeros;
      sc[t] = sh[t] = 0;
    }
  }
  if (p.pw == 4 && p.sw == 1) {
    // each token's 4 pixels of a patch row are contiguous: load 4 tokens x 4 pixels, transpose to
    // 4 pixel columns x 4 tokens. The image rows a panel needs from one channel plane are read
    // ahead a few planes early: the planes are C*H*W*4 bytes apart, too far for the hardware
    // prefetcher, and x is usually not in cache (it was just written by the backbone).
    const float* rows[48];  // first pixel of each image row the panel reads (per sample, per y)
    int nrows = 0;
    for (int t = 0; t < 16 && nrows < 48; ++t) {
      if (!valid[t]) continue;
      for (int64_t i = 0; i < p.ph && nrows < 48; ++i) {
        const float* ri = row0[t] + i * p.sh;
        if (nrows == 0 || rows[nrows - 1] < ri) rows[nrows++] = ri;
      }
    }
    constexpr int64_t kAhead = 4;
    const int64_t row_bytes = p.W * 4;
    if (t_isa == kIsaAvx512) {
      gather_px4_avx512(src, sc, sh, p.ph, seg, panel, c0, c1, rows, nrows, row_bytes, p.sc);
      return;
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (c + kAhead < c1)
        for (int r = 0; r < nrows; ++r) {
          const char* q = (const char*)(rows[r] + (c + kAhead) * p.sc);
          for (int64_t bo = 0; bo < row_bytes; bo += 64) _mm_prefetch(q + bo, _MM_HINT_T0);
        }
      for (int64_t i = 0; i < p.ph; ++i) {
        float* dst = panel + (i * 4) * seg + c * 16;
        for (int g = 0; g < 16; g += 4) {
          __m128 r0 = _mm_loadu_ps(src[g] + c * sc[g] + i * sh[g]);
          __m128 r1 = _mm_loadu_ps(src[g + 1] + c * sc[g + 1] + i * sh[g + 1]);
          __m128 r2 = _mm_loadu_ps(src[g + 2] + c * sc[g + 2] + i * sh[g + 2]);
          __m128 r3 = _mm_loadu_ps(src[g + 3] + c * sc[g + 3] + i * sh[g + 3]);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(dst + g, r0);
          _mm_storeu_ps(dst + seg + g, r1);
          _mm_storeu_ps(dst + 2 * seg + g, r2);
          _mm_storeu_ps(dst + 3 * seg + g, r3);
        }
      }
    }
  } else {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i = 0; i < p.ph; ++i)
        for (int64_t j = 0; j < p.pw; ++j) {
          float* dst = panel + (i * p.pw + j) * seg + c * 16;
          const int64_t sj = j * p.sw;
          for (int t = 0; t < 16; ++t) dst[t] = valid[t] ? src[t][c * sc[t] + i * sh[t] + sj] : 0.f;
        }
  }
}

// LayerNorm down each token column: y = (x - mean) * rstd * g + b over the d feature rows.
void layer_norm_cols(const float* X, float* Y, int64_t ld, int64_t d, int64_t cb0, int64_t cb1, const float* g,
                     const float* b, float eps) {
  const __m256 inv_d = _mm256_set1_ps(1.f / (float)d);
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const float* x = X + cb * 8;
    __m256 mean = _mm256_setzero_ps();
    for (int64_t f = 0; f < d; ++f) mean = _mm256_add_ps(mean, _mm256_loadu_ps(x + f * ld));
    mean = _mm256_mul_ps(mean, inv_d);
    __m256 var = _mm256_setzero_ps();
    for (int64_t f = 0; f < d; ++f) {
      const __m256 dv = _mm256_sub_ps(_mm256_loadu_ps(x + f * ld), mean);
      var = _mm256_fmadd_ps(dv, dv, var);
    }
    var = _mm256_mul_ps(var, inv_d);
    const __m256 rstd = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_sqrt_ps(_mm256_add_ps(var, _mm256_set1_ps(eps))));
    float* y = Y + cb * 8;
    for (int64_t f = 0; f < d; ++f) {
      const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + f * ld), mean), rstd);
      _mm256_storeu_ps(y + f * ld, _mm256_fmadd_ps(n, _mm256_set1_ps(g[f]), _mm256_set1_ps(b[f])));
    }
  }
}

// Softmax down each column of a T x ldS score tile (keys are rows, queries are columns), left
// unnormalised: St = exp(St - colmax), inv_sum[col] = 1 / sum; the P V GEMM applies inv_sum.
void softmax_cols(float* St, int64_t T, int64_t ncol, int64_t ldS, float* inv_sum) {
  for (int64_t cb = 0; cb < ncol; cb += 8) {
    float* s = St + cb;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < T; ++j) mx = _mm256_max_ps(_mm256_loadu_ps(s + j * ldS), mx);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < T; ++j) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + j * ldS), mx));
      _mm256_storeu_ps(s + j * ldS, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(inv_sum + cb, _mm256_div_ps(_mm256_set1_ps(1.f), sum));
  }
}

// One (sample, head): St = scale * K Q^T (keys x queries), softmax down columns, O^T = V^T St.
void attention_head(const Problem& p, const Plan& pl, const ChunkBufs& cb, int64_t s, int64_t h, float* St,
                    float scale) {
  const int64_t ld = pl.ld, T = p.T, kd = p.kd;
  const int64_t off = h * kd * ld + s * T;
  Epi e;
  e.alpha = scale;
  const int64_t ncol = round_up(T, 8);  // query columns computed (ldS = round16(T) keeps rows aligned)
  gemm(0, T, ncol, kd, cb.k + off, 1, ld, cb.q + off, ld, St, pl.ldS, e);
  float* inv_sum = St + T * pl.ldS;  // scratch tail (ldS + 16 floats)
  if (t_isa == kIsaAvx512)
    softmax_cols_avx512(St, T, ncol, pl.ldS, inv_sum);
  else
    softmax_cols(St, T, ncol, pl.ldS, inv_sum);
  Epi e2;
  e2.col_scale = inv_sum;
  gemm(0, kd, T, T, cb.v + off, ld, 1, St, pl.ldS, cb.o + off, ld, e2);
}

// The encoder (all layers) over one chunk of S samples starting at b0; the result is left in the
// returned buffer (tA or tB). Team phases are separated by sync().
// A team with `ypriv` (this thread's own d x ld buffer; nullptr = the old layout) folds each
// LayerNorm into the GEMM that consumes it: every thread normalises all token columns into ypriv
// itself (d x cols, a few microseconds at team sizes) instead of sharing the work and meeting at a
// barrier, and the last layer's fc2 writes its own rows of the head input (`flat`) with no barrier.
void write_flat(const Problem& p, const Plan& pl, const float* tT, int64_t b0, int64_t S, float* flat, int64_t f0,
                int64_t f1);

float* encode_chunk(const Problem& p, const Plan& pl, const ChunkBufs& cb, float* scratch0, int64_t scratch_stride,
                    int64_t b0, int64_t S, const Team& t, float* partials, int64_t part_stride, float* ypriv = nullptr,
                    float* flat = nullptr) {
  const int64_t ld = pl.ld, d = p.d, A = p.A;
  const int64_t cols = S * p.T;
  const int64_t ncomp = round_up(cols, 8);
  const int64_t P = p.C * p.ph * p.pw;

  // 1. patches -> embedding (+ bias + position), extra tokens. A team splits the channels (the GEMM's
  // K): each worker gathers its channels of every panel and multiplies them into its own partial sum
  // right away (its panel rows stay in its core's cache; splitting the weight rows instead made every
  // worker read the panel rows the other core gathered), then the partials are summed row-shared in
  // worker order (deterministic). A single worker gathers two panels right before the GEMM that
  // consumes them (32 columns), while they are still in L2.
  // The team's partial sums (workers 1.. of the channel split) into tA, row-shared, in worker order.
  auto sum_embedding_partials = [&]() {
    for_share(t, d, [&](int64_t r0, int64_t r1) {
      for (int w = 1; w < t.n; ++w) {
        int64_t c0, c1;
        Team::share(p.C, w, t.n, c0, c1);
        if (c0 == c1) continue;
        const float* part = partials + w * part_stride;
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = 0; c < ncomp; ++c) cb.tA[r * ld + c] += part[r * ld + c];
      }
    });
  };
  if (pl.direct) {
    // 1. patches -> embedding straight from x's rows (patch_embed_avx512.cpp), sample by sample. A
    // team splits the channels (K) as the panel path below does: worker 0 writes tA with bias +
    // position, the others bare partial sums.
    const int64_t pp = p.ph * p.pw;
    for (int w = t.w0; w < t.w1; ++w) {
      int64_t c0 = 0, c1 = p.C;
      if (t.n > 1) Team::share(p.C, w, t.n, c0, c1);
      const bool first = t.n == 1 || w == 0;
      if (!first && c0 == c1) continue;  // no partial (the sum skips it)
      float* dst = first ? cb.tA : partials + w * part_stride;
      // columns no patch writes: extra tokens (set below) and the padding up to ncomp
      for (int64_t r = 0; r < d; ++r) {
        float* o = dst + r * ld;
        const float* a = cb.add + r * ld;
        for (int64_t s = 0; s < S; ++s)
          for (int64_t m = p.Np; m < p.T; ++m) o[s * p.T + m] = first ? a[s * p.T + m] : 0.f;
        for (int64_t c = cols; c < ncomp; ++c) o[c] = first ? a[c] : 0.f;
        if (c0 == c1)  // fewer channels than workers and none here: bias + position only
          for (int64_t s = 0; s < S; ++s)
            for (int64_t m = 0; m < p.Np; ++m) o[s * p.T + m] = a[s * p.T + m];
      }
      if (c0 < c1) {
        // one sample: pack row block by row block into this worker's own slice of the wk region (d rows
        // of its channels, >= one block); more: into wk itself, for the samples after the first
        const PackSource pack{p.Wp, p.C, c0, c1, cb.wk_unpacked, S == 1 ? cb.wk_unpacked + d * c0 * pp : nullptr};
        for (int64_t s = 0; s < S; ++s)
          embed_rows_avx512(p.x + (b0 + s) * p.sb + c0 * p.sc, p.sc, p.sh, c1 - c0, p.ph, p.pw, p.gh, p.gw,
                            cb.wk + c0 * pp, P, d, dst + s * p.T, ld, first ? cb.add + s * p.T : nullptr, ld, nullptr,
                            s == 0 && cb.wk_unpacked ? &pack : nullptr);
      }
      mark(t, kPhEmbed);
    }
    if (t.n > 1) {
      end_phase(t, kPhEmbed);
      sum_embedding_partials();
    }
  } else {
    Epi e;
    e.add = cb.add;
    e.ld_add = ld;
    const int64_t npanel = (ncomp + 15) / 16, panel_sz = panel_floats(p);
    Shape sh;
    sh.K = p.C; sh.a_rs = P; sh.a_ks = 1; sh.ldb = 16; sh.ldc = ld;
    sh.nseg = p.ph * p.pw; sh.a_seg = p.C; sh.b_seg = panel_seg(p);
    if (t.n > 1) {
      for (int w = t.w0; w < t.w1; ++w) {
        int64_t c0, c1;
        Team::share(p.C, w, t.n, c0, c1);
        for (int64_t b = 0; b < npanel; ++b) gather_panel(p, b0, S, b * 16, cb.PT + b * panel_sz, c0, c1);
        mark(t, kPhGather);
        if (c0 < c1) {
          Shape shw = sh;
          shw.K = c1 - c0;
          // worker 0 adds bias + position embedding; the others write bare partial sums
          gemm_sh(0, d, ncomp, shw, p.Wp + c0, cb.PT + c0 * 16, w == 0 ? cb.tA : partials + w * part_stride,
                  w == 0 ? e : Epi(), panel_sz);
        } else if (w == 0) {  // fewer channels than workers and none here
          for (int64_t r = 0; r < d; ++r)
            for (int64_t c = 0; c < ncomp; ++c) cb.tA[r * ld + c] = cb.add[r * ld + c];
        }
      }
      end_phase(t, kPhEmbed);
      sum_embedding_partials();
    } else {
      for (int64_t b = 0; b < npanel; b += 2) {
        const int64_t nb = imin(2, npanel - b);
        for (int64_t j = 0; j < nb; ++j) gather_panel(p, b0, S, (b + j) * 16, cb.PT + j * panel_sz, 0, p.C);
        mark(t, kPhGather);
        Epi eb = e;
        eb.add = cb.add + b * 16;
        gemm_sh(0, d, imin(32, ncomp - b * 16), sh, p.Wp, cb.PT, cb.tA + b * 16, eb, panel_sz);
        mark(t, kPhEmbed);
      }
    }
  }
  end_phase(t, kPhEmbed);
  if (p.E > 0 && t.w0 == 0) {
    for (int64_t s = 0; s < S; ++s)
      for (int64_t e = 0; e < p.E; ++e) {
        const float* ex = p.extra + ((b0 + s) * p.E + e) * p.De;
        for (int64_t n = 0; n < d; ++n)
          cb.tA[n * ld + s * p.T + p.Np + e] = p.be[n] + dot(p.We + n * p.De, ex, p.De);
      }
  }
  if (p.E > 0) end_phase(t, kPhEmbed);

  float* cur = cb.tA;
  float* nxt = cb.tB;
  const float scale = 1.f / std::sqrt((float)p.kd);
  const int64_t ncb = ncomp / 8;
  const bool fold = ypriv != nullptr;
  float* y = fold ? ypriv : cb.y;
  for (int64_t l = 0; l < p.layers; ++l) {
    const LayerWeights& w = p.layer[l];
    if (fold) {
      layer_norm_cols(cur, y, ld, d, 0, ncb, w.g1, w.b1, p.eps);
      mark(t, kPhLayerNorm);
    } else {
      for_share(t, ncb, [&](int64_t lo, int64_t hi) { layer_norm_cols(cur, y, ld, d, lo, hi, w.g1, w.b1, p.eps); });
      end_phase(t, kPhLayerNorm);
    }
    const float* Ws[3] = {w.Wq, w.Wk, w.Wv};
    const float* bs[3] = {w.bq, w.bk, w.bv};
    float* outs[3] = {cb.q, cb.k, cb.v};
    Epi eo;
    eo.row_bias = w.bo;
    eo.add = cur;
    eo.ld_add = ld;
    if (t.n > 1 && p.heads >= t.n) {
      // Team split by heads: each worker computes Q/K/V rows of its heads, their attention for every
      // sample and the out-projection over exactly those rows of O^T (K split) into a partial sum
      // (worker 0's carries bias and residual); the partials are summed row-shared in worker order.
      // Nothing crosses cores until that sum: one barrier less than splitting Q/K/V and out-projection
      // rows and (sample, head) pairs separately. All Q/K/V first: in the folded layout a worker's
      // partial buffer may be the y the thread's Q/K/V read.
      for (int wk = t.w0; wk < t.w1; ++wk) {
        int64_t h0, h1;
        Team::share(p.heads, wk, t.n, h0, h1);
        const int64_t r0 = h0 * p.kd, r1 = h1 * p.kd;
        for (int j = 0; j < 3; ++j) {
          Epi e;
          e.row_bias = bs[j];
          gemm(r0, r1, ncomp, d, Ws[j], d, 1, y, ld, outs[j], ld, e);
        }
        // queries past the chunk's last token are read (into discarded score columns): keep them finite
        for (int64_t r = r0; r < r1; ++r) {
          std::memset(cb.q + r * ld + ncomp, 0, (ld - ncomp) * sizeof(float));
          std::memset(cb.o + r * ld + ncomp, 0, (ld - ncomp) * sizeof(float));
        }
        mark(t, kPhQKV);
        float* St = scratch0 + (wk - t.w0) * scratch_stride;
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t s = 0; s < S; ++s) attention_head(p, pl, cb, s, h, St, scale);
        // the last sample's padding columns of O^T are never written by the masked attention store
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = cols; c < ncomp; ++c) cb.o[r * ld + c] = 0.f;
        mark(t, kPhAttention);
      }
      // heads >= workers: every worker has at least one head (Team::share), so each writes its partial
      for (int wk = t.w0; wk < t.w1; ++wk) {
        int64_t h0, h1;
        Team::share(p.heads, wk, t.n, h0, h1);
        const int64_t r0 = h0 * p.kd, r1 = h1 * p.kd;
        gemm(0, d, ncomp, r1 - r0, w.Wo + r0, A, 1, cb.o + r0 * ld, ld, wk == 0 ? cb.t1 : partials + wk * part_stride,
             ld, wk == 0 ? eo : Epi());
      }
      end_phase(t, kPhOutProj);
      for_share(t, d, [&](int64_t r0, int64_t r1) {
        for (int wk = 1; wk < t.n; ++wk) {
          const float* part = partials + wk * part_stride;
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t c = 0; c < ncomp; ++c) cb.t1[r * ld + c] += part[r * ld + c];
        }
      });
    } else {
      for (int j = 0; j < 3; ++j) {
        Epi e;
        e.row_bias = bs[j];
        for_row_share(t, A, [&](int64_t r0, int64_t r1) { gemm(r0, r1, ncomp, d, Ws[j], d, 1, y, ld, outs[j], ld, e); });
      }
      // queries past the chunk's last token are read (into discarded score columns): keep them finite
      for_share(t, A, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          std::memset(cb.q + r * ld + ncomp, 0, (ld - ncomp) * sizeof(float));
          std::memset(cb.o + r * ld + ncomp, 0, (ld - ncomp) * sizeof(float));
        }
      });
      end_phase(t, kPhQKV);
      for (int wk = t.w0; wk < t.w1; ++wk) {
        int64_t lo, hi;
        Team::share(S * p.heads, wk, t.n, lo, hi);
        float* St = scratch0 + (wk - t.w0) * scratch_stride;
        for (int64_t sh = lo; sh < hi; ++sh) attention_head(p, pl, cb, sh / p.heads, sh % p.heads, St, scale);
        // the last sample's padding columns of O^T are never written by the masked attention store
        if (hi == S * p.heads)
          for (int64_t r = 0; r < A; ++r)
            for (int64_t c = cols; c < ncomp; ++c) cb.o[r * ld + c] = 0.f;
      }
      end_phase(t, kPhAttention);
      for_row_share(t, d, [&](int64_t r0, int64_t r1) { gemm(r0, r1, ncomp, A, w.Wo, A, 1, cb.o, ld, cb.t1, ld, eo); });
    }
    end_phase(t, kPhOutProj);
    if (fold) {
      layer_norm_cols(cb.t1, y, ld, d, 0, ncb, w.g2, w.b2, p.eps);
      mark(t, kPhLayerNorm);
    } else {
      for_share(t, ncb, [&](int64_t lo, int64_t hi) { layer_norm_cols(cb.t1, y, ld, d, lo, hi, w.g2, w.b2, p.eps); });
      end_phase(t, kPhLayerNorm);
    }
    const bool last_flat = fold && flat && l == p.layers - 1;
    Epi e1;
    e1.row_bias = w.c1;
    e1.act = kGelu;
    Epi e2;
    e2.row_bias = w.c2;
    if (p.residual) {
      e2.add = cb.t1;
      e2.ld_add = ld;
    }
    if (t.n > 1) {
      // MLP split by hidden unit: each worker's fc2 takes only the h rows its fc1 just wrote (K split;
      // before, fc2 split its output rows and read half of h from the other core), into a partial sum;
      // worker 0's carries bias and residual. All fc1 rows of this thread first: in the folded layout
      // a worker's partial buffer may be the y the thread's fc1 reads.
      for_row_share(t, p.mlp, [&](int64_t r0, int64_t r1) { gemm(r0, r1, ncomp, d, w.W1, d, 1, y, ld, cb.h, ld, e1); });
      mark(t, kPhFc1);
      for (int wk = t.w0; wk < t.w1; ++wk) {
        int64_t m0, m1;
        worker_rows(t, p.mlp, wk, m0, m1);
        if (m0 < m1)
          gemm(0, d, ncomp, m1 - m0, w.W2 + m0, p.mlp, 1, cb.h + m0 * ld, ld, wk == 0 ? nxt : partials + wk * part_stride,
               ld, wk == 0 ? e2 : Epi());
        else if (wk == 0)  // fewer row blocks of h than workers and none here: nxt still needs bias (+ residual)
          for (int64_t r = 0; r < d; ++r)
            for (int64_t c = 0; c < ncomp; ++c) nxt[r * ld + c] = w.c2[r] + (p.residual ? cb.t1[r * ld + c] : 0.f);
      }
      end_phase(t, kPhFc2);
      for_share(t, d, [&](int64_t r0, int64_t r1) {
        for (int wk = 1; wk < t.n; ++wk) {
          int64_t m0, m1;
          worker_rows(t, p.mlp, wk, m0, m1);
          if (m0 == m1) continue;
          const float* part = partials + wk * part_stride;
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t c = 0; c < ncomp; ++c) nxt[r * ld + c] += part[r * ld + c];
        }
        if (last_flat) write_flat(p, pl, nxt, b0, S, flat, r0, r1);  // rows this worker just summed
      });
    } else {
      gemm(0, p.mlp, ncomp, d, w.W1, d, 1, y, ld, cb.h, ld, e1);
      mark(t, kPhFc1);
      gemm(0, d, ncomp, p.mlp, w.W2, p.mlp, 1, cb.h, ld, nxt, ld, e2);
      if (last_flat) write_flat(p, pl, nxt, b0, S, flat, 0, d);
    }
    if (last_flat) {
      mark(t, kPhFc2);  // the caller's barrier before the head follows
    } else {
      end_phase(t, kPhFc2);
    }
    float* tmp = cur;
    cur = nxt;
    nxt = tmp;
  }
  return cur;
}

// Head input, flattened per sample in (token, feature) order like the reference's view(B, T*d):
// feature-major flatT[(m*d + f)][b] for the GEMM head, row-major flat[b][m*d + f] otherwise.
void write_flat(const Problem& p, const Plan& pl, const float* tT, int64_t b0, int64_t S, float* flat, int64_t f0,
                int64_t f1) {
  const int64_t T = p.T, d = p.d;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t f = f0; f < f1; ++f) {
      const float* src = tT + f * pl.ld + s * T;
      if (pl.head_gemm) {
        for (int64_t m = 0; m < T; ++m) flat[(m * d + f) * pl.ldf + b0 + s] = src[m];
      } else {
        for (int64_t m = 0; m < T; ++m) flat[(b0 + s) * T * d + m * d + f] = src[m];
      }
    }
}

}  // namespace

void gemm_tiles(int isa, int64_t r0, int64_t r1, int64_t ncols, const Shape& sh, const float* A, const float* Bm,
                float* C, const Epi& e, int64_t b_blk) {
  const int saved = t_isa;  // the caller may be inside run() on this thread: put its ISA back
  t_isa = isa;
  gemm_sh(r0, r1, ncols, sh, A, Bm, C, e, b_blk);
  t_isa = saved;
}

void gelu_forward(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu_ps(_mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = tail_mask((int)(n - i));
    _mm256_maskstore_ps(y + i, m, gelu_ps(_mm256_maskload_ps(x + i, m)));
  }
}

// gelu'(x) = Phi(x) + x phi(x) = 0.5 (1 + erf(x / sqrt2)) + x exp(-x^2 / 2) / sqrt(2 pi)
inline __m256 gelu_grad_ps(__m256 g, __m256 x) {
  const __m256 cdf = _mm256_fmadd_ps(_mm256_set1_ps(0.5f), erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f))),
                                     _mm256_set1_ps(0.5f));
  const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),
                                   exp_ps(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x))));
  return _mm256_mul_ps(g, _mm256_fmadd_ps(x, pdf, cdf));
}

// GELU and its derivative in one pass (fused_avx2.h): y = gelu_ps(x) and dydx = Phi(x) + x phi(x) with
// the ops of gelu_ps / gelu_grad_ps (one erf for both), so y and g * dydx are the bits gelu_forward and
// gelu_backward give. The AVX-512 variant (fused_avx512.cpp) computes the same ops 16 lanes wide.
inline void gelu_fg_ps(__m256 x, __m256& y, __m256& d) {
  const __m256 e = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
  y = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  const __m256 cdf = _mm256_fmadd_ps(_mm256_set1_ps(0.5f), e, _mm256_set1_ps(0.5f));
  const __m256 pdf = _mm256_mul_ps(_mm256_set1_ps(0.39894228040143268f),
                                   exp_ps(_mm256_mul_ps(_mm256_set1_ps(-0.5f), _mm256_mul_ps(x, x))));
  d = _mm256_fmadd_ps(x, pdf, cdf);
}

void gelu_forward_grad(int isa, const float* x, float* y, float* dydx, int64_t n) {
  if (isa == kIsaAvx512) return gelu_forward_grad_avx512(x, y, dydx, n);
  int64_t i = 0;
  __m256 yv, dv;
  for (; i + 8 <= n; i += 8) {
    gelu_fg_ps(_mm256_loadu_ps(x + i), yv, dv);  // x is read before dydx is written (dydx may be x)
    _mm256_storeu_ps(y + i, yv);
    _mm256_storeu_ps(dydx + i, dv);
  }
  if (i < n) {
    const __m256i m = tail_mask((int)(n - i));
    gelu_fg_ps(_mm256_maskload_ps(x + i, m), yv, dv);
    _mm256_maskstore_ps(y + i, m, yv);
    _mm256_maskstore_ps(dydx + i, m, dv);
  }
}

void gelu_backward(const float* g, const float* x, float* dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dx + i, gelu_grad_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(x + i)));
  if (i < n) {
    const __m256i m = tail_mask((int)(n - i));
    _mm256_maskstore_ps(dx + i, m, gelu_grad_ps(_mm256_maskload_ps(g + i, m), _mm256_maskload_ps(x + i, m)));
  }
}

int64_t attention_forward_floats(int64_t T, int64_t kd) {
  const int64_t kdp = round_up(kd, 16), Tp = round_up(T, 16);
  return kdp * Tp + T * Tp + T * T + 64;
}

void attention_forward_head(const float* q, const float* k, const float* v, int64_t ld_qkv, float* P,
                            const float* mask, float* o, int64_t ld_o, int64_t T, int64_t kd, float scale,
                            float* scratch) {
  const int64_t kdp = round_up(kd, 16), Tp = round_up(T, 16);
  float* KT = scratch;      // kd x Tp: K transposed, zero-padded columns
  float* S = KT + kdp * Tp;  // T x Tp scores
  float* Pd = S + T * Tp;    // T x T: P * mask
  for (int64_t c = 0; c < kd; ++c)
    for (int64_t j = 0; j < Tp; ++j) KT[c * Tp + j] = j < T ? k[j * ld_qkv + c] : 0.f;
  Epi sc;
  sc.alpha = scale;
  gemm(0, T, T, kd, q, ld_qkv, 1, KT, Tp, S, Tp, sc);  // S[i][j] = s sum_c Q[i][c] K[j][c]
  const int tail = (int)(T % 8);
  const int64_t full = T - tail;
  const __m256i tm = tail_mask(tail);
  for (int64_t i = 0; i < T; ++i) {
    const float* srow = S + i * Tp;
    float* prow = P + i * T;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < full; j += 8) mx = _mm256_max_ps(_mm256_loadu_ps(srow + j), mx);
    if (tail) mx = _mm256_max_ps(_mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(srow + full, tm),
                                                  _mm256_castsi256_ps(tm)), mx);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const __m256 rmax = _mm256_set1_ps(_mm_cvtss_f32(m4));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(srow + j), rmax));
      _mm256_storeu_ps(prow + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (tail) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(srow + full, tm), rmax));
      _mm256_maskstore_ps(prow + full, tm, e);
      sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(tm)));
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (int64_t j = 0; j < full; j += 8) _mm256_storeu_ps(prow + j, _mm256_mul_ps(_mm256_loadu_ps(prow + j), inv));
    if (tail) _mm256_maskstore_ps(prow + full, tm, _mm256_mul_ps(_mm256_maskload_ps(prow + full, tm), inv));
  }
  const float* Pdrop = P;
  if (mask) {
    for (int64_t e = 0; e < T * T; ++e) Pd[e] = P[e] * mask[e];
    Pdrop = Pd;
  }
  // O[i][c] = sum_j Pd[i][j] V[j][c], V read in place: its rows are qkv rows, so the floats past column
  // kd are the next head's (or the next token's) - the masked tail reads none of them
  Shape sv;
  sv.K = T; sv.a_rs = T; sv.a_ks = 1; sv.ldb = ld_qkv; sv.ldc = ld_o;
  sv.b_masked_tail = true;
  gemm_sh(0, T, kd, sv, Pdrop, v, o, Epi());
}

int64_t attention_backward_floats(int64_t T, int64_t kd) {
  const int64_t kdp = round_up(kd, 16), Tp = round_up(T, 16);
  return 3 * T * kdp + kdp * Tp + T * Tp + T * T + 64;
}

void attention_backward_head(const float* q, const float* k, const float* v, int64_t ld_qkv, const float* P,
                             const float* mask, const float* dO, int64_t ld_do, float* dq, float* dk, float* dv,
                             int64_t ld_d, int64_t T, int64_t kd, float scale, float* scratch) {
  const int64_t kdp = round_up(kd, 16), Tp = round_up(T, 16);
  // local, zero-padded copies: every B operand is read up to a 16-column boundary
  float* Ql = scratch;
  float* Kl = Ql + T * kdp;
  float* dOl = Kl + T * kdp;
  float* VT = dOl + T * kdp;  // kd x Tp: V transposed
  float* dP = VT + kdp * Tp;  // T x Tp
  float* Pd = dP + T * Tp;    // T x T: P * mask (only with a mask)
  for (int64_t i = 0; i < T; ++i) {
    for (int64_t c = 0; c < kdp; ++c) {
      const bool in = c < kd;
      Ql[i * kdp + c] = in ? q[i * ld_qkv + c] : 0.f;
      Kl[i * kdp + c] = in ? k[i * ld_qkv + c] : 0.f;
      dOl[i * kdp + c] = in ? dO[i * ld_do + c] : 0.f;
    }
  }
  for (int64_t c = 0; c < kd; ++c)
    for (int64_t j = 0; j < Tp; ++j) VT[c * Tp + j] = j < T ? v[j * ld_qkv + c] : 0.f;
  const float* Pdrop = P;
  if (mask) {
    for (int64_t e = 0; e < T * T; ++e) Pd[e] = P[e] * mask[e];
    Pdrop = Pd;
  }
  Epi plain;
  // dV[j][c] = sum_i Pdrop[i][j] dO[i][c]
  gemm(0, T, kd, T, Pdrop, 1, T, dOl, kdp, dv, ld_d, plain);
  // dP[i][j] = sum_c dO[i][c] V[j][c]
  gemm(0, T, T, kd, dOl, kdp, 1, VT, Tp, dP, Tp, plain);
  // dS = P * (dP*mask - rowsum(P * dP*mask)), in place in dP
  for (int64_t i = 0; i < T; ++i) {
    float* d = dP + i * Tp;
    const float* p = P + i * T;
    if (mask)
      for (int64_t j = 0; j < T; ++j) d[j] *= mask[i * T + j];
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= T; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(d + j), acc);
    float dot_ = hsum(acc);
    for (; j < T; ++j) dot_ += p[j] * d[j];
    const __m256 dv8 = _mm256_set1_ps(dot_);
    j = 0;
    for (; j + 8 <= T; j += 8)
      _mm256_storeu_ps(d + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(d + j), dv8)));
    for (; j < T; ++j) d[j] = p[j] * (d[j] - dot_);
  }
  Epi sc;
  sc.alpha = scale;
  // dQ[i][c] = s sum_j dS[i][j] K[j][c];  dK[j][c] = s sum_i dS[i][j] Q[i][c]
  gemm(0, T, kd, T, dP, Tp, 1, Kl, kdp, dq, ld_d, sc);
  gemm(0, T, kd, T, dP, 1, Tp, Ql, kdp, dk, ld_d, sc);
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// libgcc's __builtin_cpu_supports reports an AVX-512 feature only when XCR0 shows the OS saves the
// opmask and ZMM state, so this covers OS support too. SLVIT_FAST_CPU_TEST_HIDE_FEATURE=<name> (test
// knob) makes that one feature count as missing, to test the fallback and the error on any CPU.
const char* avx512_missing() {
  __builtin_cpu_init();
  const char* hide = std::getenv("SLVIT_FAST_CPU_TEST_HIDE_FEATURE");
  const bool has[4] = {__builtin_cpu_supports("avx512f") != 0, __builtin_cpu_supports("avx512dq") != 0,
                       __builtin_cpu_supports("avx512bw") != 0, __builtin_cpu_supports("avx512vl") != 0};
  static const char* const names[4] = {"avx512f", "avx512dq", "avx512bw", "avx512vl"};
  for (int i = 0; i < 4; ++i)
    if (!has[i] || (hide && std::strcmp(hide, names[i]) == 0)) return names[i];
  return nullptr;
}

int64_t workspace_floats(const Problem& p, int nw) {
  const Plan pl = make_plan(p, nw);
  const int64_t sets = pl.team ? 1 : nw;
  return pl.n_flat + pl.n_hid + pl.n_outT + sets * pl.n_set + nw * (pl.n_scratch + pl.n_ypriv) + pl.n_wk + 64;
}

void set_profiling(bool on) {
  for (int i = 0; i < kNumPhases; ++i) t_prof[i] = 0.0;
  g_prof = on;
}

void read_profile(double* cycles) {
  for (int i = 0; i < kNumPhases; ++i) cycles[i] = t_prof[i];
}

namespace {
void run_isa(const Problem& p, float* ws, int nw, int wlo, int whi, Barrier* bar);
}

void run(const Problem& p, float* ws, int nw, int wlo, int whi, Barrier* bar) {
  const int saved_isa = t_isa;
  const int64_t saved_kblock = t_kblock;
  t_isa = p.isa;
  const char* kb = std::getenv("SLVIT_FAST_CPU_TEST_KBLOCK");  // Shape::k_block for measuring/tests
  t_kblock = kb && *kb ? std::strtoll(kb, nullptr, 10) : 0;
  run_isa(p, ws, nw, wlo, whi, bar);
  t_isa = saved_isa;
  t_kblock = saved_kblock;
}

namespace {
void run_isa(const Problem& p, float* ws, int nw, int wlo, int whi, Barrier* bar) {
  const Plan pl = make_plan(p, nw);
  const Team team{wlo, whi, nw, bar};
  if (g_prof && wlo == 0) t_last = __rdtsc();
  // score-tile columns past round8(T) are read (into discarded results) by the P V product: finite
  for (int w = wlo; w < whi; ++w) {
    float* st = ws + pl.n_flat + pl.n_hid + pl.n_outT + (pl.team ? 1 : nw) * pl.n_set + w * pl.n_scratch;
    for (int64_t i = 0; i < pl.n_scratch; ++i) st[i] = 0.f;
  }
  float* flat = ws;
  float* hid = flat + pl.n_flat;
  float* outT = hid + pl.n_hid;
  float* sets = outT + pl.n_outT;
  float* scratch = sets + (pl.team ? 1 : nw) * pl.n_set;
  const int64_t Td = p.T * p.d;

  if (pl.head_gemm && wlo == 0)  // batch padding columns of the head input (read, results discarded)
    for (int64_t k = 0; k < Td; ++k)
      for (int64_t c = p.B; c < pl.ldf; ++c) flat[k * pl.ldf + c] = 0.f;

  // Plan::direct: the patch-embedding weight in (e, c, i, j) order. A team member packs the channels
  // it multiplies (its K share) and reads no others, inside its embedding call (row block by row block,
  // the next block's weight fetched while the current one multiplies); workers that own samples need
  // every channel, so they pack a share each here and meet at a barrier.
  float* wk = scratch + nw * (pl.n_scratch + pl.n_ypriv);
  if (pl.direct && !pl.team) {  // (a team's members pack inside their embedding calls: ChunkBufs::wk_unpacked)
    for (int w = wlo; w < whi; ++w) {
      int64_t c0, c1;
      Team::share(p.C, w, nw, c0, c1);
      pack_patch_weight(p.Wp, p.d, p.C, p.ph, p.pw, c0, c1, wk);
    }
    end_phase(team, kPhGather);
  }

  if (pl.team) {
    ChunkBufs cb = chunk_bufs(p, pl, sets);
    cb.wk = wk;
    if (pl.direct) cb.wk_unpacked = wk;
    // only worker 0 reads `add` (in its embedding partial, with no barrier before it): it builds it
    if (wlo == 0) build_add(p, pl, cb.add, 0, p.d);
    // worker w's d x ld buffer: its embedding partial sum, later (fold) its LayerNorm output, which it
    // writes only after the barrier that follows the sum of the partials
    float* wbufs = scratch + nw * pl.n_scratch;
    if (pl.fold) {
      float* ypriv = wbufs + wlo * pl.n_ypriv;
      encode_chunk(p, pl, cb, scratch + wlo * pl.n_scratch, pl.n_scratch, 0, p.B, team, wbufs, pl.n_ypriv, ypriv, flat);
    } else {
      const float* tT =
          encode_chunk(p, pl, cb, scratch + wlo * pl.n_scratch, pl.n_scratch, 0, p.B, team, wbufs, pl.n_ypriv);
      for_share(team, p.d, [&](int64_t f0, int64_t f1) { write_flat(p, pl, tT, 0, p.B, flat, f0, f1); });
      mark(team, kPhFlat);
    }
  } else {
    // Workers claim chunks of pl.S samples in order from a shared counter instead of owning a fixed
    // share of the batch: on a shared machine one core is often slower, and at batch 64 worker 0 waited
    // 1.3-3.7M of ~27M cycles at the head's barrier for the other's static half. Each sample's result is
    // the same bits whichever chunk or worker computes it (every column's sums run in the same order).
    const Team solo{0, 1, 1, nullptr};
    const int64_t nchunks = (p.B + pl.S - 1) / pl.S;
    for (int w = wlo; w < whi; ++w) {
      ChunkBufs cb = chunk_bufs(p, pl, sets + w * pl.n_set);
      cb.wk = wk;
      float* st = scratch + w * pl.n_scratch;
      build_add(p, pl, cb.add, 0, p.d);
      for (int64_t k = __atomic_fetch_add(&bar->next_chunk, 1, __ATOMIC_RELAXED); k < nchunks;
           k = __atomic_fetch_add(&bar->next_chunk, 1, __ATOMIC_RELAXED)) {
        const int64_t b0 = k * pl.S, S = imin(pl.S, p.B - b0);
        const float* tT = encode_chunk(p, pl, cb, st, pl.n_scratch, b0, S, solo, nullptr, 0);
        write_flat(p, pl, tT, b0, S, flat, 0, p.d);
        mark(team, kPhFlat);
      }
    }
  }
  end_phase(team, kPhOther);

  // head: hidden = act(Wh1 flat + bh1); out = Wh2 hidden + bh2
  if (pl.head_gemm) {
    Epi e;
    e.row_bias = p.bh1;
    e.act = p.head_act;
    for_row_share(team, p.hidden, [&](int64_t r0, int64_t r1) {
      gemm(r0, r1, round_up(p.B, 8), Td, p.Wh1, Td, 1, flat, pl.ldf, hid, pl.ldf, e);
    });
    end_phase(team, kPhHead);
    Epi e2;
    e2.row_bias = p.bh2;
    // each worker transposes the output rows it computed (no barrier before the copy)
    for_row_share(team, p.outputs, [&](int64_t r0, int64_t r1) {
      gemm(r0, r1, p.B, p.hidden, p.Wh2, p.hidden, 1, hid, pl.ldf, outT, pl.ldf, e2);
      if (!p.legacy_phases)
        for (int64_t b = 0; b < p.B; ++b)
          for (int64_t o = r0; o < r1; ++o) p.out[b * p.outputs + o] = outT[o * pl.ldf + b];
    });
    if (p.legacy_phases) {
      team.sync();
      for_share(team, p.B, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b)
          for (int64_t o = 0; o < p.outputs; ++o) p.out[b * p.outputs + o] = outT[o * pl.ldf + b];
      });
    }
    mark(team, kPhHead);
  } else {
    for_share(team, p.hidden, [&](int64_t lo, int64_t hi) {
      for (int64_t b = 0; b < p.B; ++b)
        for (int64_t n = lo; n < hi; ++n)
          hid[b * p.hidden + n] = act_scalar(dot(p.Wh1 + n * Td, flat + b * Td, Td) + p.bh1[n], p.head_act);
    });
    end_phase(team, kPhHead);
    for_share(team, p.B * p.outputs, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = i / p.outputs, o = i % p.outputs;
        p.out[i] = dot(p.Wh2 + o * p.hidden, hid + b * p.hidden, p.hidden) + p.bh2[o];
      }
    });
    mark(team, kPhHead);
  }
}

}  // namespace

}  // namespace slvit_fused
