"""Kernel launches of one exit forward.

CUDA: every CUDA kernel the torch profiler sees during one forward (ours and any torch kernel, e.g.
eager PyTorch's ~25), memory copies excluded. CPU: the launches our backends record through
:func:`slvit_fast.profiling.count_kernel_launches` - meaningful for the emulated CUDA kernels
(``cuda-emu``) and the interpreted Triton kernels; the ``torch`` and ``cpu`` backends launch no GPU
kernels, so their count is "n/a" with the reason.
"""

from __future__ import annotations

import torch

from ..profiling import count_kernel_launches


def cuda_kernels_in(fn) -> int:
    """CUDA kernels launched by ``fn()`` as seen by the torch profiler (memcpy/memset events excluded)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events()
               if e.device_type.name == "CUDA" and not e.name.lower().startswith(("memcpy", "memset")))


def forward_launches(module, x: torch.Tensor, extra: torch.Tensor | None) -> tuple[int | None, str]:
    """(launches of one inference forward, how counted / why n/a)."""
    def forward():
        with torch.inference_mode():
            module(x, extra)

    if x.device.type == "cuda":
        forward()  # warm: first-call compilation / autotuning launches are not part of the count
        return cuda_kernels_in(forward), "torch profiler (CUDA kernels)"
    with count_kernel_launches() as counter:
        forward()
    if counter.by_kernel:
        return counter.count, "recorded by the backend (emulated/interpreted GPU kernels)"
    return None, "n/a on CPU: no GPU kernels (the cpu backend is one fused C++ op call; torch runs ATen ops)"
