// The feature-map gradient dx of the CPU training backward (slvit_cpu.cpp exit_backward), from a cache of
// freed blocks. A dx is as large as x (25 MB at resnet152-b1, batch 64); glibc serves allocations above
// its mmap threshold (at most 32 MiB) with fresh mappings, so from about batch 86 at resnet152-b1 every
// step's dx cost a page fault and a kernel page clear per 4 KiB before the scatter could write it
// (measured: 12.5K faults per step at batch 128; a scatter into fresh pages ~3x slower than into mapped
// ones). A block freed by the previous step's gradient is still mapped.
#pragma once

#include <ATen/core/Tensor.h>

namespace slvit_cpu {

// An uninitialized float32 tensor with x's sizes and, like at::empty_like, x's strides when x is
// non-overlapping and dense (else channels_last or contiguous, as x's suggested memory format). Its block
// comes from / returns to a process-wide cache of free blocks (exact byte sizes, at most
// SLVIT_FAST_CPU_TRAIN_POOL_MB megabytes cached, default 256, 0 = plain at::empty_like).
at::Tensor pooled_grad_like(const at::Tensor& x);

}  // namespace slvit_cpu
