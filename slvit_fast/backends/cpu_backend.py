"""Backend "cpu": the fused C++ CPU kernels (csrc/cpu/), the default for CPU tensors when built.

The whole exit forward is one op call (``slvit_fast::cpu_exit_forward``) and the whole backward one
more (``slvit_fast::cpu_exit_backward``), so batch 1 pays no per-layer framework overhead. Inputs of
any floating dtype are computed in float32 and the result is returned in the input dtype.

Threading: problems under 256 token rows (batch 1-4 at the paper's sizes) run on the calling thread
only (per-thread OpenMP/MKL settings, restored afterwards); larger batches use ATen's thread pool and
MKL. ``SLVIT_FAST_CPU_FUSED=0`` (or false/no/off) turns the fused AVX2 inference path off; the C++ side
reads it, with the spellings and errors of :func:`slvit_fast.backends.env.flag`. Inference
keeps intermediates in a per-thread arena reused across calls (it holds the largest
batch's intermediates, ~60 MB at batch 64 for the ResNet presets). float64 is left to the 'torch'
backend (the fused kernels compute in float32).

Dropout is not fused: an exit in training mode with a non-zero dropout rate runs the reference
(torch) math instead, with a one-time warning (:mod:`slvit_fast.backends.common`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import native, reference
from ..ops import cpp_ops
from .common import dropout_active, reference_fallback


def _fast_entry():
    """``_C_cpu.exit_infer`` (csrc/cpu/module_cpu.cpp): the inference forward straight from the module, with
    no per-call Python work; it returns None whenever the op path below must run (autograd, dropout,
    fp16/bf16, modes, fused kernels off). None when the extension predates it."""
    global _exit_infer
    if _exit_infer is False:
        _exit_infer = getattr(native.load("cpu"), "exit_infer", None)
    return _exit_infer


_exit_infer = False


class CPUBackend:
    name = "cpu"

    def unavailable_reason(self, x: Tensor) -> str | None:
        reason = cpp_ops.ensure_registered("cpu")
        if reason is not None:
            return reason
        if x.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got a tensor on {x.device}"
        if x.dtype == torch.float64:
            return "float64 runs on the 'torch' backend (the fused CPU kernels compute in float32)"
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"unsupported dtype {x.dtype}"
        return None

    def slvit_exit(self, module, x: Tensor, extra: Tensor | None) -> Tensor:
        fast = _exit_infer or _fast_entry()
        if fast is not None and not torch.compiler.is_compiling():
            out = fast(module, x, extra)
            if out is not None:
                return out
        if dropout_active(module):
            return reference_fallback(module, x, extra, self.name)
        params = reference.module_params(module)
        save = torch.is_grad_enabled() and (
            x.requires_grad or (extra is not None and extra.requires_grad) or any(p.requires_grad for p in params))
        out = torch.ops.slvit_fast.cpu_exit_forward(
            x, extra, params, cpp_ops.config_ints(module.config), module.config.ln_eps, save)
        return out[0]


BACKEND = CPUBackend()
