// Stand-alone check of the tensor-core GEMM (csrc/cuda/slvit_mma.cuh: block_gemm_tc, the code every
// GEMM stage of the exit kernels runs) under the SIMT emulator, against a float64 matmul of the same
// rounded operands. No torch: tests/test_emu_mma_layout.py compiles it with g++ in seconds, once as is
// (must pass) and once with -DSLVIT_EMU_PLANT_MMA_BUG (a wrong fragment layout in the emulator: must fail).
// Prints one line per case: "<dtype> rows cols K max_rel_err"; exit status 1 if any case exceeds its bound.
#define SLVIT_EMULATE 1
#include "slvit_device.cuh"

#include <cstdio>
#include <random>
#include <vector>

namespace slvit {
template <class S>
__global__ void gemm_check_kernel(const float* A, const S* W, float* out, int rows, int cols, int K) {
  block_gemm_tc<S>(rows, cols, K, [&](int r, int k) { return A[(int64_t)r * K + k]; }, W, K,
                   [&](int r, int c, float acc) { out[(int64_t)r * cols + c] = acc; });
}
}  // namespace slvit

template <class S>
static float to_s_and_back(float v, S* s) {
  *s = S(v);
  return (float)*s;
}
static float to_s_and_back(float v, float* s) {
  *s = v;
  return v;
}

template <class S>
static bool run_case(const char* name, int rows, int cols, int K, int threads, double bound) {
  std::mt19937 gen(rows * 1000 + cols * 10 + K);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> A((size_t)rows * K), Wf((size_t)cols * K);
  std::vector<S> W((size_t)cols * K);
  for (auto& v : A) v = nd(gen);
  for (size_t i = 0; i < W.size(); ++i) Wf[i] = to_s_and_back(nd(gen), &W[i]);
  std::vector<float> out((size_t)rows * cols, NAN);
  SLVIT_LAUNCH(slvit::gemm_check_kernel<S>, dim3(1), dim3(threads), 0, nullptr, A.data(), W.data(), out.data(), rows,
               cols, K);
  double worst = 0.0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      double ref = 0.0, mag = 0.0;
      for (int k = 0; k < K; ++k) {
        // the kernel feeds A rounded to S (16-bit) or to tf32; compare with float64 on the fp32 inputs,
        // normalised by sum |a w|, so the bound is twice the unit roundoff of A's rounding
        ref += (double)A[(size_t)r * K + k] * Wf[(size_t)c * K + k];
        mag += std::fabs((double)A[(size_t)r * K + k] * Wf[(size_t)c * K + k]);
      }
      const double got = out[(size_t)r * cols + c];
      const double rel = std::isfinite(got) ? std::fabs(got - ref) / (mag + 1e-30) : INFINITY;
      if (rel > worst) worst = rel;
    }
  std::printf("%s %d %d %d %.3e\n", name, rows, cols, K, worst);
  return worst <= bound;
}

int main() {
  bool ok = true;
  const int shapes[][3] = {{16, 8, 16}, {16, 16, 32}, {37, 40, 19}, {144, 32, 48}, {5, 3, 7}};
  for (auto& s : shapes) {
    ok &= run_case<__nv_bfloat16>("bf16", s[0], s[1], s[2], 256, 1.0 / 128);
    ok &= run_case<__half>("fp16", s[0], s[1], s[2], 128, 1.0 / 1024);
    ok &= run_case<float>("tf32", s[0], s[1], s[2], 64, 1.0 / 1024);
  }
  std::printf(ok ? "OK\n" : "FAILED\n");
  return ok ? 0 : 1;
}
