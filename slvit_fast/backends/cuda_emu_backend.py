"""Backend "cuda-emu": the CUDA kernels of csrc/cuda/ run on CPU tensors under the SIMT emulator.

A *test* backend (never chosen by "auto"): it is how the CUDA kernels are checked on machines without
a GPU. The same kernel source the "cuda" backend compiles with nvcc is compiled as host C++ against
csrc/emu/simt_emu.h: blocks run in turn, a block's threads are host threads scheduled one at a time
between barriers (deterministic, so a missing ``__syncthreads`` shows as a wrong answer, never as a
flaky race), warp shuffles go through a per-warp buffer, and every launch is checked like the driver
checks it. Slow by design (every CUDA thread is a host thread): keep batches and shapes small.

Forward: the two CUDA kernels (counted as 2 launches by :func:`slvit_fast.profiling.count_kernel_launches`).
Backward: the CUDA backward kernel (one launch; it recomputes the forward activations per sample)
for one-layer exits, the reference math recomputed in torch for deeper ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import cpp_ops
from ..profiling import record_launches
from .cpu_backend import _dropout_active, reference_fallback

FORWARD_LAUNCHES = 2
MAX_LAYERS = 4


def check_config(module) -> str | None:
    if module.config.num_layers > MAX_LAYERS:
        return f"the CUDA kernels support num_layers <= {MAX_LAYERS}, got {module.config.num_layers}"
    return None


class CudaEmuBackend:
    name = "cuda-emu"

    def unavailable_reason(self, x: Tensor) -> str | None:
        reason = cpp_ops.ensure_registered("emu")
        if reason is not None:
            return reason
        if x.device.type != "cpu":
            return f"the cuda-emu backend runs on CPU tensors, got a tensor on {x.device}"
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the CUDA kernels support float32, float16 and bfloat16, got {x.dtype}"
        return None

    def slvit_exit(self, module, x: Tensor, extra: Tensor | None) -> Tensor:
        reason = check_config(module)
        if reason is not None:
            raise ValueError(f"backend 'cuda-emu': {reason}")
        if _dropout_active(module):
            return reference_fallback(module, x, extra, self.name)
        record_launches("slvit_fast.cuda.exit_forward", FORWARD_LAUNCHES)
        return torch.ops.slvit_fast.emu_exit_forward(
            x, extra, cpp_ops.module_params(module), cpp_ops.config_ints(module.config), module.config.ln_eps)


BACKEND = CudaEmuBackend()
