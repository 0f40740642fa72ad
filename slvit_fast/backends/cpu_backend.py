"""Backend "cpu": the fused C++ CPU kernels (csrc/cpu/), the default for CPU tensors when built.

The whole exit forward is one op call (``slvit_fast::cpu_exit_forward``) and the whole backward one
more (``slvit_fast::cpu_exit_backward``), so batch 1 pays no per-layer framework overhead. Inputs of
any floating dtype are computed in float32 and the result is returned in the input dtype.

Threading: problems under 256 token rows (batch 1-4 at the paper's sizes) run on the calling thread
only (per-thread OpenMP/MKL settings, restored afterwards); larger batches use ATen's thread pool and
MKL. ``SLVIT_FAST_CPU_FUSED=0`` (or false/no/off) turns the fused AVX2 inference path off; the C++ side
reads it, with the spellings and errors of :func:`slvit_fast.backends.env.flag`. The fused path's GEMMs
run on AVX-512 tiles when the CPU and OS support them, else AVX2; ``SLVIT_FAST_CPU_ISA=avx2|avx512``
forces one (``auto`` = default; read by the C++ side on every call) and :func:`fused_isa` reports the
one in use. Inference
keeps intermediates in a per-thread arena reused across calls (it holds the largest
batch's intermediates, ~60 MB at batch 64 for the ResNet presets). float64 is left to the 'torch'
backend (the fused kernels compute in float32).

Dropout is fused (csrc/cpu/slvit_cpu.cpp): in training mode with a non-zero rate the op's ``cfg``
carries three drop thresholds ``round(rate * 2**32)`` and a seed drawn from torch's default generator
(so ``torch.manual_seed`` reproduces a run); an element is kept iff a counter-based hash of (seed,
dropout site, its index in the batch tensor) clears the threshold, so the mask does not depend on the
thread count or chunking and the backward regenerates it instead of storing it. The masks are
statistically, not bitwise, equal to ``F.dropout``'s (tests/test_cpu_train_dropout.py re-implements
the rule independently). The other fused backends still fall back to the reference for dropout
(:mod:`slvit_fast.backends.common`).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import backends as _registry  # the package: its registry is read per call (fast_forward)
from .. import native, reference
from ..ops import cpp_ops
from . import env
from .common import dropout_active


def _fast_entry():
    """``_C_cpu.exit_infer`` (csrc/cpu/module_cpu.cpp): the inference forward straight from the module, with
    no per-call Python work; it returns None whenever the op path below must run (autograd, dropout,
    fp16/bf16, modes, fused kernels off). None when the extension predates it."""
    global _exit_infer
    if _exit_infer is False:
        _exit_infer = getattr(native.load("cpu"), "exit_infer", None)
    return _exit_infer


_exit_infer = False
_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting
# SLVIT_FAST_BACKEND read from os.environ's own mapping: os.environ.get() raises and catches KeyError
# inside when the variable is unset (the usual case), which measured ~35 us per call at batch 1 (the
# exception machinery runs with cold caches right after the kernel); a dict lookup costs ~1 us. Same
# data - os.environ keeps it, putenv follows it - so a change is seen on the next call.
try:
    _env_data, _env_backend_key, _env_decode = os.environ._data, os.environ.encodekey(env.BACKEND), os.environ.decodevalue
except AttributeError:  # not CPython's os.environ
    _env_data = None


def fast_forward(module, x, extra):
    """``SLViTExit.forward``'s first step (batch-1 latency, issue 14): ``_C_cpu.exit_infer`` straight away
    when backend resolution (``slvit_fast.backends.resolve``) would pick this backend for a float32 CPU
    input - the only inputs exit_infer accepts; it checks the input against the config itself and
    returns None whenever the full path must run, which then makes the usual checks and raises their
    errors. None here: take the full path.

    Nothing is cached: every input of the choice is read on every call, in the order resolve reads
    them (not compiling - a compiled graph must not call the extension -, not exporting - ONNX export
    takes the reference ops -, the registry holds this backend object - tests swap in doubles -, the
    module's ``backend``, then ``SLVIT_FAST_BACKEND`` and ``AUTO_ORDER["cpu"]`` for "auto"). At batch 1
    every Python operation here runs with cold caches after the previous kernel: measured, this gate
    costs ~8 us over calling exit_infer directly, the full path's checks and resolution ~45 us."""
    if _is_compiling() or _is_exporting():
        return None
    fast = _exit_infer if _exit_infer is not False else _fast_entry()
    if fast is None or _registry._loaded.get("cpu") is not BACKEND or cpp_ops.ensure_registered("cpu") is not None:
        return None
    requested = module.backend
    if requested == "auto":
        if _env_data is not None:
            raw = _env_data.get(_env_backend_key)
            raw = "" if raw is None else _env_decode(raw)
        else:
            raw = os.environ.get(env.BACKEND, "")
        requested = raw.strip() or "auto"
        if requested == "auto" and _registry.AUTO_ORDER.get("cpu", ("torch",))[0] == "cpu":
            requested = "cpu"
    if requested != "cpu":
        return None
    return fast(module, x, extra)


def fused_isa() -> str | None:
    """The instruction set the fused inference path uses now: ``"avx512"`` or ``"avx2"``; None when that
    path is off (``SLVIT_FAST_CPU_FUSED=0``), not built, or the CPU lacks AVX2+FMA. Asks the extension
    (``slvit_fast::cpu_fused_isa``), which applies ``SLVIT_FAST_CPU_ISA`` exactly as inference does, so a
    bad value raises the same RuntimeError naming it (or the missing CPU feature for a forced avx512)."""
    if cpp_ops.ensure_registered("cpu") is not None or not hasattr(torch.ops.slvit_fast, "cpu_fused_isa"):
        return None
    return torch.ops.slvit_fast.cpu_fused_isa() or None


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
        params = reference.module_params(module)
        save = torch.is_grad_enabled() and (
            x.requires_grad or (extra is not None and extra.requires_grad) or any(p.requires_grad for p in params))
        cfg = cpp_ops.config_ints(module.config)
        if dropout_active(module):
            if torch.compiler.is_compiling() or torch.jit.is_tracing():
                # The mask seed is a Python int drawn per call: a compiled graph would guard on it and
                # recompile every step, and a trace would freeze one mask. Those run the reference ops,
                # whose dropout the compiler and tracer handle natively.
                return reference.slvit_exit(x, params, module.config, extra, training=True)
            cfg = cfg + _dropout_ints(module.config)
        out = torch.ops.slvit_fast.cpu_exit_forward(x, extra, params, cfg, module.config.ln_eps, save)
        return out[0]


def _dropout_ints(c) -> list[int]:
    """The 4 extra ``cfg`` ints of the fused dropout: drop thresholds of the three dropout sites and a seed
    (from torch's default generator, so ``torch.manual_seed`` makes the masks reproducible)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return [round(c.dropout * 2**32), round(c.attention_dropout * 2**32), round(c.head_dropout * 2**32), seed]


BACKEND = CPUBackend()
