"""Forward and every gradient of each backend vs the float64 reference, with paired tolerances.

For one exit configuration and batch the float64 reference (torch backend) runs once; for each dtype
the torch reference in that dtype runs once (its error sets the paired bound); then every backend
runs the same weights and inputs in that dtype. Compared: the output, the gradient of the feature
map (and of the extra tokens) and of every parameter, for a fixed random output gradient.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field

import torch

from ..config import SLViTConfig
from ..profiling import count_kernel_launches
from ..slvit_exit import SLViTExit
from .tolerance import DTYPES, TOLERANCES, TensorCheck, paired_check, reference_stats


def randomize_(exit_module: SLViTExit, seed: int = 0) -> SLViTExit:
    """Non-trivial, reproducible values for every parameter (LayerNorm affine included), as the suite does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in exit_module.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            std = 1.0 / fan_in**0.5 if p.dim() > 1 else 0.2
            values = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                values = 1.0 + values
            p.copy_(values.to(p.dtype))
    return exit_module


@contextlib.contextmanager
def matmul_precision(precision: str | None):
    """Run a block with ``torch.set_float32_matmul_precision(precision)`` (None: leave it), then restore."""
    if precision is None:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def reference_threads(device: str):
    """Run the torch reference on one CPU thread. Its many tiny ATen ops each enter a parallel region,
    and on a busy (oversubscribed) machine every such barrier can wait a scheduler slice: measured here,
    0.5 s vs 0.01 s per forward+backward. Its values do not depend on the thread count beyond rounding,
    which the paired tolerance allows. The backends under test keep the user's thread count."""
    if device != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Run:
    output: torch.Tensor
    grads: dict[str, torch.Tensor | None]
    seconds: float = 0.0
    launches: int | None = None  # GPU kernel launches the backend recorded in the forward (None: none)


CPU_LAUNCH_NOTE = "recorded by the backend in the forward (emulated/interpreted GPU kernels)"
CPU_NO_LAUNCHES = "n/a on CPU: no GPU kernels (the cpu backend is one fused C++ op call; torch runs ATen ops)"


def run_exit(module: SLViTExit, x: torch.Tensor, extra: torch.Tensor | None, grad_out: torch.Tensor) -> Run:
    """Forward + backward with ``grad_out``; gradients of x, extra and every parameter (None if missing).

    The launches our backends record (:func:`slvit_fast.profiling.record_launches`) during the forward
    are counted: on a CPU that is how the emulated/interpreted GPU kernels show their launch count.
    """
    device = x.device.type
    x = x.detach().clone().requires_grad_(True)
    extra = None if extra is None else extra.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    with count_kernel_launches() as counter:
        out = module(x, extra)
    out.backward(grad_out.to(out.dtype))
    _sync(device)
    seconds = time.perf_counter() - t0
    grads = {"input x": x.grad}
    if extra is not None:
        grads["input extra"] = extra.grad
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return Run(out.detach(), grads, seconds, counter.count if counter.by_kernel else None)


@dataclass
class CaseResult:
    """One backend x configuration x dtype: every tensor compared, or the error that stopped it."""

    backend: str
    dtype: str
    batch: int
    checks: list[TensorCheck] = field(default_factory=list)
    error: str = ""  # exception raised by the backend (a failure)
    first_call_s: float = 0.0  # the backend's first forward+backward here (Triton compiles in it on CUDA)
    output_dtype: str = ""
    launches: int | None = None  # recorded launches of the forward (CPU; CUDA counts with the profiler)
    launches_note: str = CPU_NO_LAUNCHES

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.checks) and all(c.ok for c in self.checks)

    def worst(self) -> TensorCheck | None:
        return max(self.checks, key=lambda c: c.ratio, default=None)

    def max_errors(self) -> dict:
        out = next((c for c in self.checks if c.name == "output"), None)
        grads = [c for c in self.checks if c.name != "output"]
        worst_grad = max(grads, key=lambda c: c.ratio, default=None)
        return {
            "output": None if out is None else out.error,
            "output_bound": None if out is None else out.bound,
            "gradient": max((c.error for c in grads), default=None),  # largest absolute error of any gradient
            "worst_gradient": None if worst_grad is None else worst_grad.name,
            "worst_gradient_error": None if worst_grad is None else worst_grad.error,
            "worst_gradient_bound": None if worst_grad is None else worst_grad.bound,
            "error_over_bound": None if not self.checks else self.worst().ratio,
        }


def check_config(config: SLViTConfig, batch: int, backend_dtypes: dict[str, tuple[str, ...]], device: str,
                 seed: int = 0) -> list[CaseResult]:
    """Check every backend in each of its dtypes on one configuration and batch."""
    base = randomize_(SLViTExit(config, backend="torch").double(), seed).eval().to(device)
    g = torch.Generator().manual_seed(seed + 1)
    H, W = config.feature_size
    x = torch.randn(batch, config.in_channels, H, W, generator=g, dtype=torch.float64).to(device)
    extra = None
    if config.extra_tokens:
        extra = torch.randn(batch, config.extra_tokens, config.extra_dim, generator=g, dtype=torch.float64).to(device)
    grad_out = torch.randn(batch, config.num_outputs, generator=g, dtype=torch.float64).to(device)
    with matmul_precision("highest"), reference_threads(device):
        ref64 = run_exit(base, x, extra, grad_out)

    results = []
    dtypes = [d for d in DTYPES if any(d in dts for dts in backend_dtypes.values())]
    for dt_name in dtypes:
        dtype, precision = DTYPES[dt_name]
        tol = TOLERANCES[dt_name]
        xe = (x.to(dtype), None if extra is None else extra.to(dtype))
        with matmul_precision(precision), reference_threads(device):
            ref_low = run_exit(copy.deepcopy(base).to(dtype), *xe, grad_out)
        # one pass over each reference pair, shared by every backend checked in this dtype
        stats = {"output": reference_stats(ref_low.output, ref64.output)}
        stats.update({f"grad {t}": reference_stats(ref_low.grads[t], g64) for t, g64 in ref64.grads.items()})
        for name, dts in backend_dtypes.items():
            if dt_name not in dts:
                continue
            result = CaseResult(name, dt_name, batch)
            ours = copy.deepcopy(base).to(dtype)
            ours.backend = name
            # the torch backend *is* the reference ops: same single-thread reasoning as above
            threads = reference_threads(device) if name == "torch" else contextlib.nullcontext()
            try:
                with matmul_precision(precision), threads:
                    run = run_exit(ours, *xe, grad_out)
            except Exception as e:  # a crashing backend is a failed check, reported with its message
                result.error = f"{type(e).__name__}: {str(e)[:400]}"
                results.append(result)
                continue
            result.first_call_s = run.seconds
            result.launches = run.launches
            if run.launches is not None:
                result.launches_note = CPU_LAUNCH_NOTE
            result.output_dtype = str(run.output.dtype).replace("torch.", "")
            if run.output.dtype != dtype:
                result.error = f"output dtype {run.output.dtype}, expected {dtype}"
            result.checks.append(paired_check("output", run.output, stats["output"], None, tol))
            for tname in ref64.grads:
                result.checks.append(paired_check(f"grad {tname}", run.grads.get(tname), stats[f"grad {tname}"], None, tol))
            results.append(result)
    return results
