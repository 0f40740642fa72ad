// GEMM-level checks of the fused inference tiles (csrc/cpu/fused_tiles.h: gemm_tiles on either ISA), built
// and run by tests/test_cpu_gemm_tiles.py together with csrc/cpu/fused_avx2.cpp and fused_avx512.cpp (both
// are torch-free). The extension hides these symbols, so the tiles are linked here directly.
//
//   harness acc ISA M N K NSEG KBLOCK   random GEMM with every epilogue term (alpha, col_scale, row_bias,
//                                       add, GELU), B in NSEG segments; prints "maxrel <err> <bound>":
//                                       max |C - ref| / max |ref| against a float64 reference, and the
//                                       same for float32 summed in blocks of <= 512 (a pairwise-ish bound)
//   harness guard ISA MASKED N K        B (K x N, row pitch N, no column padding) ends at a page followed
//                                       by a PROT_NONE page: a read of a column >= N on the last row
//                                       faults (SIGSEGV); prints "maxrel <err>" otherwise
#include "../csrc/cpu/fused_avx2.h"
#include "../csrc/cpu/fused_tiles.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using namespace slvit_fused;

static uint64_t g_state = 88172645463325252ull;
static float urand() {  // xorshift, uniform in [-1, 1)
  g_state ^= g_state << 13;
  g_state ^= g_state >> 7;
  g_state ^= g_state << 17;
  return (float)((g_state >> 40) * (1.0 / 8388608.0) - 1.0);
}

static int isa_of(const char* s) {
  if (!std::strcmp(s, "avx2")) return kIsaAvx2;
  if (!std::strcmp(s, "avx512")) {
    if (avx512_missing()) {
      std::printf("skip no avx512\n");
      std::exit(0);
    }
    return kIsaAvx512;
  }
  std::fprintf(stderr, "unknown isa %s\n", s);
  std::exit(2);
}

static double gelu(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

static int accuracy(int isa, int64_t M, int64_t N, int64_t K, int64_t nseg, int64_t kblock) {
  const int64_t Kt = K * nseg, ldb = N + 16, ldc = N + 16;  // padded: the AVX2 tiles read B to 16 columns
  // A: M x Kt stored with segments interleaved like the patch embedding's weight (a_seg = K floats per
  // segment inside each row of Kt), B: segment s at Bm + s*b_seg, K rows each
  std::vector<float> A(M * Kt), Bm(nseg * K * ldb + 64), C(M * ldc, 0.f), add(M * ldc), bias(M), cs(N + 16);
  for (auto& v : A) v = urand();
  for (auto& v : Bm) v = urand() / std::sqrt((float)Kt);
  for (auto& v : add) v = 0.5f * urand();
  for (auto& v : bias) v = 0.5f * urand();
  for (auto& v : cs) v = 1.f + 0.5f * urand();
  const float alpha = 0.75f;
  Shape sh;
  sh.K = K; sh.a_rs = Kt; sh.a_ks = 1; sh.ldb = ldb; sh.ldc = ldc;
  sh.nseg = nseg; sh.a_seg = K; sh.b_seg = K * ldb;
  sh.k_block = kblock;
  Epi e;
  e.col_scale = cs.data(); e.row_bias = bias.data(); e.add = add.data(); e.ld_add = ldc;
  e.alpha = alpha; e.act = kGelu;
  gemm_tiles(isa, 0, M, N, sh, A.data(), Bm.data(), C.data(), e);
  double scale = 0, err = 0, err_blk = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < N; ++c) {
      double s = 0, blk = 0;
      float fb = 0.f, part = 0.f;
      for (int64_t k = 0; k < Kt; ++k) {
        const double prod = (double)A[r * Kt + k] * Bm[k * ldb + c];
        s += prod;
        part = std::fma(A[r * Kt + k], Bm[k * ldb + c], part);
        if ((k + 1) % 512 == 0 || k + 1 == Kt) {
          fb += part;
          part = 0.f;
        }
      }
      blk = fb;
      const auto epi = [&](double v) {
        return gelu(alpha * cs[c] * v + bias[r] + add[r * ldc + c]);
      };
      const double ref = epi(s);
      scale = std::fmax(scale, std::fabs(ref));
      err = std::fmax(err, std::fabs(C[r * ldc + c] - ref));
      err_blk = std::fmax(err_blk, std::fabs(epi(blk) - ref));
    }
  // columns past N of C are never written
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = N; c < ldc; ++c)
      if (C[r * ldc + c] != 0.f) {
        std::printf("wrote column %ld\n", (long)c);
        return 1;
      }
  std::printf("maxrel %.6e %.6e\n", err / scale, err_blk / scale);
  return 0;
}

static int guard(int isa, bool masked, int64_t N, int64_t K) {
  const int64_t M = 7;
  const long page = sysconf(_SC_PAGESIZE);
  const int64_t bytes = K * N * (int64_t)sizeof(float);
  const int64_t span = (bytes + page - 1) / page * page;
  char* mem = (char*)mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED || mprotect(mem + span, page, PROT_NONE)) {
    std::perror("mmap");
    return 2;
  }
  float* Bm = (float*)(mem + span - bytes);  // B's last float is the last one before the guard page
  std::vector<float> A(M * K), C(M * N);
  for (auto& v : A) v = urand();
  for (int64_t i = 0; i < K * N; ++i) Bm[i] = urand();
  Shape sh;
  sh.K = K; sh.a_rs = K; sh.a_ks = 1; sh.ldb = N; sh.ldc = N;
  sh.b_masked_tail = masked;
  Epi e;
  gemm_tiles(isa, 0, M, N, sh, A.data(), Bm, C.data(), e);
  double err = 0, scale = 0;
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < N; ++c) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (double)A[r * K + k] * Bm[k * N + c];
      scale = std::fmax(scale, std::fabs(s));
      err = std::fmax(err, std::fabs(C[r * N + c] - s));
    }
  std::printf("maxrel %.6e\n", err / scale);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 8 && !std::strcmp(argv[1], "acc"))
    return accuracy(isa_of(argv[2]), std::atol(argv[3]), std::atol(argv[4]), std::atol(argv[5]), std::atol(argv[6]),
                    std::atol(argv[7]));
  if (argc == 6 && !std::strcmp(argv[1], "guard"))
    return guard(isa_of(argv[2]), std::atoi(argv[3]) != 0, std::atol(argv[4]), std::atol(argv[5]));
  std::fprintf(stderr, "usage: see the comment at the top of cpu_gemm_harness.cpp\n");
  return 2;
}
