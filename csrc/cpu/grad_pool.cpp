// Cache of feature-map gradient blocks (see grad_pool.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "grad_pool.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace slvit_cpu {
namespace {

// SLVIT_FAST_CPU_TRAIN_POOL_MB, parsed like slvit_cpu.cpp's saved-activation pool (the same knob caps
// each cache). nothrow: a deleter must not throw (a bad value is reported by the next allocation).
size_t cap_bytes(bool nothrow) {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_POOL_MB");
  if (!env || !*env) return size_t(256) << 20;
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  const bool ok = end != env && *end == 0 && mb >= 0 && mb < 1e6;
  if (!ok && nothrow) return 0;
  TORCH_CHECK(ok, "slvit_fast: SLVIT_FAST_CPU_TRAIN_POOL_MB must be a number of megabytes (0 to 1e6), got '", env,
              "'");
  return (size_t)(mb * (1 << 20));
}

class GradPool {
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;

 public:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, 64, bytes) == 0, "slvit_fast: out of memory allocating ", bytes, " bytes");
    return p;
  }
  void give(void* p, size_t bytes) {
    const size_t cap = cap_bytes(true);
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cached_ + bytes <= cap) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
};

GradPool& pool() {
  static GradPool* p = new GradPool();  // never destroyed: gradients may be freed during exit
  return *p;
}

}  // namespace

at::Tensor pooled_grad_like(const at::Tensor& x) {
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  if (cap_bytes(false) == 0 || x.numel() == 0) return at::empty_like(x, fopt);
  std::vector<int64_t> strides(x.dim());
  if (x.is_non_overlapping_and_dense()) {
    strides.assign(x.strides().begin(), x.strides().end());
  } else {
    const auto fmt = x.suggest_memory_format();
    if (fmt == at::MemoryFormat::ChannelsLast && x.dim() == 4) {  // (N, C, H, W) stored as N, H, W, C
      strides[1] = 1;
      strides[3] = x.size(1);
      strides[2] = x.size(3) * strides[3];
      strides[0] = x.size(2) * strides[2];
    } else {
      int64_t s = 1;
      for (int64_t i = x.dim() - 1; i >= 0; --i) {
        strides[i] = s;
        s *= x.size(i);
      }
    }
  }
  const size_t bytes = ((size_t)x.numel() * sizeof(float) + 4095) / 4096 * 4096;
  void* p = pool().take(bytes);
  return at::from_blob(p, x.sizes(), strides, [bytes](void* q) { pool().give(q, bytes); }, fopt);
}

}  // namespace slvit_cpu
