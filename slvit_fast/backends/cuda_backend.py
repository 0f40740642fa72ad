"""Backend "cuda": the CUDA C++ kernels of csrc/cuda/ (extension ``slvit_fast._C_cuda``).

Forward: two kernel launches (encoder block per sample, then the flatten head), fp32/fp16/bf16 with
float32 accumulation. Backward: two launches for 1..4 encoder layers: the backward kernel (it
recomputes the forward per sample from per-layer token checkpoints; each block sums its samples'
parameter gradients in its own partial slot, no atomics) and one reduction of the slots. The same kernel source
is tested on CPU through the "cuda-emu" backend (no GPU here), which is this class on another op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..ops import cpp_ops
from ..profiling import record_launches
from .common import dropout_active, reference_fallback

FORWARD_LAUNCHES = 2
MAX_LAYERS = 4


class CudaKernelBackend:
    """The CUDA exit kernels behind one torch op: compiled by nvcc ("cuda") or emulated ("cuda-emu")."""

    def __init__(self, name: str, extension: str, device_type: str, op_name: str):
        self.name, self.extension, self.device_type, self.op_name = name, extension, device_type, op_name

    def unavailable_reason(self, x: Tensor) -> str | None:
        reason = cpp_ops.ensure_registered(self.extension)
        if reason is not None:
            return reason
        if x.device.type != self.device_type:
            return f"the {self.name} backend runs on {self.device_type.upper()} tensors, got a tensor on {x.device}"
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the CUDA kernels support float32, float16 and bfloat16, got {x.dtype}"
        return None

    def slvit_exit(self, module, x: Tensor, extra: Tensor | None) -> Tensor:
        if module.config.num_layers > MAX_LAYERS:
            raise ValueError(f"backend {self.name!r}: the CUDA kernels support num_layers <= {MAX_LAYERS}, "
                             f"got {module.config.num_layers}")
        if dropout_active(module):
            return reference_fallback(module, x, extra, self.name)
        record_launches("slvit_fast.cuda.exit_forward", FORWARD_LAUNCHES)
        op = getattr(torch.ops.slvit_fast, self.op_name)
        return op(x, extra, reference.module_params(module), cpp_ops.config_ints(module.config),
                  module.config.ln_eps)


BACKEND = CudaKernelBackend("cuda", "cuda", "cuda", "cuda_exit_forward")
