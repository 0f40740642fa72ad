// BLAS and OpenMP entry points of the libraries torch already loaded, resolved at run time with
// dlsym (no MKL/OpenBLAS/OpenMP headers or link flags): a row-major sgemm with an ATen fallback, and
// scopes that make BLAS / OpenMP run single-threaded on the calling thread. Used by slvit_cpu.cpp.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <dlfcn.h>

#include <cstdint>

namespace slvit_cpu {

// Fortran BLAS sgemm as exported by the library torch links (MKL on x86 wheels, OpenBLAS elsewhere).
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*,
                         const float*, const int*, const float*, const int*, const float*, float*,
                         const int*);

inline sgemm_fn find_sgemm() {
  static sgemm_fn fn = []() -> sgemm_fn {
    const char* names[] = {"sgemm_", "SGEMM", "sgemm"};
    for (const char* n : names) {
      if (void* p = dlsym(RTLD_DEFAULT, n)) return reinterpret_cast<sgemm_fn>(p);
    }
    return nullptr;
  }();
  return fn;
}

// Row-major GEMM: C(MxN) = alpha * op(A) op(B) + beta * C. Uses the BLAS sgemm linked into torch
// when it can be found, else ATen mm on strided views.
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  if (sgemm_fn f = find_sgemm()) {
    const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
    const int m = (int)N, n = (int)M, k = (int)K, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
    f(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor a = ta ? at::from_blob(const_cast<float*>(A), {M, K}, {1, lda}, opts)
                : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<float*>(B), {K, N}, {1, ldb}, opts)
                : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::Tensor r = at::mm(a, b);
  if (beta == 0.f) {
    c.copy_(r.mul_(alpha));
  } else {
    c.mul_(beta).add_(r, alpha);
  }
}

// MKL's per-thread thread count (nullptr when torch's BLAS is not MKL): the per-head GEMMs are tiny
// and already run inside at::parallel_for, so BLAS-level threading there only adds overhead.
typedef int (*mkl_local_threads_fn)(int);
inline mkl_local_threads_fn find_mkl_local_threads() {
  static mkl_local_threads_fn fn = reinterpret_cast<mkl_local_threads_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
}
struct SequentialBlas {
  int prev = 0;
  mkl_local_threads_fn fn = find_mkl_local_threads();
  SequentialBlas() { if (fn) prev = fn(1); }
  ~SequentialBlas() { if (fn) fn(prev); }
};

// Small problems (batch 1-4 at the paper's sizes, ~0.2 ms of work) run on the calling thread only:
// each ATen op's own OpenMP region costs 5-20 us when the machine is idle and milliseconds when the
// other core is busy, which is most of an exit's time at batch 1. OpenMP's thread count is a
// per-thread setting (omp_set_num_threads) and MKL's has a thread-local variant, so this does not
// change what other threads see. Resolved with dlsym: no OpenMP/MKL headers or link flags needed.
struct SingleThreadScope {
  typedef int (*get_fn)();
  typedef void (*set_fn)(int);
  static inline const get_fn omp_get = reinterpret_cast<get_fn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
  static inline const set_fn omp_set = reinterpret_cast<set_fn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  int prev_omp = 0, prev_mkl = 0;
  bool active = false;
  mkl_local_threads_fn mkl = find_mkl_local_threads();
  explicit SingleThreadScope(bool enable) {
    if (!enable || at::in_parallel_region() || !omp_get || !omp_set) return;
    active = true;
    prev_omp = omp_get();
    omp_set(1);
    if (mkl) prev_mkl = mkl(1);
  }
  ~SingleThreadScope() {
    if (!active) return;
    omp_set(prev_omp);
    if (mkl) mkl(prev_mkl);
  }
};

}  // namespace slvit_cpu
