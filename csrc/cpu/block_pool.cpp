// One cache of freed blocks for the CPU training path's large buffers (see block_pool.h).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "block_pool.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

namespace slvit_cpu {
namespace {

// SLVIT_FAST_CPU_TRAIN_POOL_MB in bytes, or -1 when the value is malformed.
int64_t parse_cap() {
  const char* env = std::getenv("SLVIT_FAST_CPU_TRAIN_POOL_MB");
  if (!env || !*env) return int64_t(256) << 20;
  char* end = nullptr;
  const double mb = std::strtod(env, &end);
  if (end == env || *end != 0 || !(mb >= 0 && mb < 1e6)) return -1;
  return (int64_t)(mb * (1 << 20));
}

class BlockPool {
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
  void give(void* p, size_t bytes) noexcept {
    const int64_t cap = parse_cap();  // a bad value keeps nothing; the next allocation reports it
    {
      std::lock_guard<std::mutex> g(mu_);
      if (cap > 0 && cached_ + bytes <= (size_t)cap) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  size_t cached() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }
};

BlockPool& pool() {
  static BlockPool* p = new BlockPool();  // never destroyed: tensors may be freed during exit
  return *p;
}

}  // namespace

size_t block_pool_cap_bytes() {
  const int64_t cap = parse_cap();
  TORCH_CHECK(cap >= 0, "slvit_fast: SLVIT_FAST_CPU_TRAIN_POOL_MB must be a number of megabytes (0 to 1e6), got '",
              std::getenv("SLVIT_FAST_CPU_TRAIN_POOL_MB"), "'");
  return (size_t)cap;
}

void* block_pool_take(size_t bytes) { return pool().take(bytes); }
void block_pool_give(void* p, size_t bytes) noexcept { pool().give(p, bytes); }
size_t block_pool_cached_bytes() { return pool().cached(); }

at::Tensor pooled_grad_like(const at::Tensor& x) {
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  if (block_pool_cap_bytes() == 0 || x.numel() == 0) return at::empty_like(x, fopt);
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
  void* p = block_pool_take(bytes);
  return at::from_blob(p, x.sizes(), strides, [bytes](void* q) { block_pool_give(q, bytes); }, fopt);
}

}  // namespace slvit_cpu
