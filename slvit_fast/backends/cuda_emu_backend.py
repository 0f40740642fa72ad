"""Backend "cuda-emu": the CUDA kernels of csrc/cuda/ run on CPU tensors under the SIMT emulator.

A *test* backend (never chosen by "auto"): it is how the CUDA kernels are checked on machines without
a GPU. The same kernel source the "cuda" backend compiles with nvcc is compiled as host C++ against
csrc/emu/simt_emu.h: blocks run in turn, a block's CUDA threads are fibers of one host thread switched
at barriers in a fixed order (deterministic, so a missing ``__syncthreads`` shows as a wrong answer,
never as a flaky race), warp shuffles go through a per-warp buffer, and every launch is checked like
the driver checks it. Slow by design: keep batches and shapes small.

Forward: the two CUDA kernels (counted as 2 launches by :func:`slvit_fast.profiling.count_kernel_launches`).
Backward: the CUDA backward kernel (one launch; it recomputes the forward activations per sample)
for one-layer exits, the reference math recomputed in torch for deeper ones.
"""

from .cuda_backend import CudaKernelBackend

BACKEND = CudaKernelBackend("cuda-emu", "emu", "cpu", "emu_exit_forward")
