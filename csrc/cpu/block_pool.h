// The CPU training path's large buffers from ONE process-wide cache of freed blocks: the fused path's
// saved activations (train_fused_path.cpp: pooled_slack) and the backward's feature-map gradient dx
// (slvit_cpu.cpp exit_backward: pooled_grad_like). A training step's ~80 MB of fresh saved tensors and a
// dx as large as x (25 MB at resnet152-b1, batch 64) cost a page fault and a kernel page clear per 4 KiB
// on first touch when glibc serves them as fresh mappings (above its mmap threshold, at most 32 MiB;
// measured: 12.5K faults per step for dx at batch 128, a scatter into fresh pages ~3x slower than into
// mapped ones), while a block freed by the previous step is already mapped. Blocks are matched by exact
// byte size (rounded up to 4 KiB); at most SLVIT_FAST_CPU_TRAIN_POOL_MB megabytes (default 256, 0 = off)
// of free blocks are kept, in total for both uses; a block freed beyond that goes back to the OS.
// Blocks return from whichever thread drops the last reference.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace slvit_cpu {

// The cache bound in bytes (SLVIT_FAST_CPU_TRAIN_POOL_MB); raises on a malformed value.
size_t block_pool_cap_bytes();

// `bytes` (a multiple of 4096) of 64-byte aligned memory, from the cache when a freed block of that
// size is there; block_pool_give returns it (called by tensor deleters: never throws).
void* block_pool_take(size_t bytes);
void block_pool_give(void* p, size_t bytes) noexcept;

// Bytes of free blocks the cache holds now (tests: the bound covers both uses together).
size_t block_pool_cached_bytes();

// An uninitialized float32 tensor with x's sizes and, like at::empty_like, x's strides when x is
// non-overlapping and dense (else channels_last or contiguous, as x's suggested memory format), its
// block from the cache (plain at::empty_like when the cache is off).
at::Tensor pooled_grad_like(const at::Tensor& x);

}  // namespace slvit_cpu
