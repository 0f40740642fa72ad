"""The exit microbenchmark: our backends vs eager PyTorch vs ``torch.compile`` of the reference.

For one preset, batch size and mode it builds the implementations, checks they agree with the
reference (a benchmark of a wrong kernel is worthless), then times them interleaved.

* ``eager``   - the torch backend (the reference ops, eager mode);
* ``compile`` - ``torch.compile`` (inductor) of the same reference function;
* every fused backend usable here (``cpu`` on this machine; ``triton``/``cuda`` on a GPU).

Modes: ``inference`` (``torch.inference_mode``, eval) and ``train`` (forward + backward of the exit
with respect to its parameters, as in classifier-wise training).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .. import backends, reference
from ..accounting import slvit_flops
from ..slvit_exit import SLViTExit
from .timing import time_interleaved

FUSED_BACKENDS = ("cpu", "triton", "cuda")


@dataclass
class ExitBenchResult:
    preset: str
    batch: int
    mode: str
    device: str
    flops: float  # per call (forward; x3 for forward+backward)
    times_s: dict[str, float] = field(default_factory=dict)
    gflops: dict[str, float] = field(default_factory=dict)
    speedup_vs_eager: dict[str, float] = field(default_factory=dict)
    speedup_vs_compile: dict[str, float] = field(default_factory=dict)
    fraction_of_matmul_peak: dict[str, float] = field(default_factory=dict)
    max_abs_diff_vs_eager: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def usable_fused_backends(x: torch.Tensor) -> list[str]:
    names = []
    for name in FUSED_BACKENDS:
        try:
            backend = backends.get(name)
        except (NotImplementedError, RuntimeError):
            continue
        if backend.unavailable_reason(x) is None:
            names.append(name)
    return names


def _inputs(exit_module: SLViTExit, batch: int, device: str, seed: int = 0):
    c = exit_module.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, *c.feature_size, generator=g).to(device)
    extra = torch.randn(batch, c.extra_tokens, c.extra_dim, generator=g).to(device) if c.extra_tokens else None
    return x, extra


def build_impls(preset: str, batch: int, mode: str, device: str = "cpu", include: tuple[str, ...] | None = None,
                seed: int = 0) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], torch.Tensor]], float]:
    """(timed callables, output-producing callables for the agreement check, forward FLOPs per call)."""
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    torch.manual_seed(seed)
    base = SLViTExit.from_preset(preset, backend="torch").to(device)
    base.train(mode == "train")
    x, extra = _inputs(base, batch, device, seed)
    flops = float(slvit_flops(base.config)) * batch
    names = ["eager", "compile", *usable_fused_backends(x)]
    if include is not None:
        names = [n for n in names if n in include]

    modules: dict[str, SLViTExit] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        m = copy.deepcopy(base)
        modules[name] = m
        if name == "compile":
            params = dict(m.named_parameters())
            cfg = m.config
            compiled = torch.compile(lambda x_, e_, p=params, c=cfg: reference.slvit_exit(x_, p, c, e_, training=False))
            calls[name] = lambda f=compiled: f(x, extra)
        else:
            m.backend = "torch" if name == "eager" else name
            calls[name] = lambda m=m: m(x, extra)

    if mode == "inference":
        def timed(fn):
            def run():
                with torch.inference_mode():
                    return fn()
            return run
        timed_calls = {n: timed(f) for n, f in calls.items()}
        outputs = timed_calls
    else:
        def step(fn, m):
            def run():
                out = fn()
                out.sum().backward()  # gradients accumulate: the same work every call
                return out
            return run
        timed_calls = {n: step(f, modules[n]) for n, f in calls.items()}
        outputs = calls
    return timed_calls, outputs, flops


def run_exit_bench(preset: str, batch: int, mode: str = "inference", device: str = "cpu", repeats: int = 15,
                   matmul_peak_gflops: float | None = None, include: tuple[str, ...] | None = None) -> ExitBenchResult:
    impls, outputs, flops = build_impls(preset, batch, mode, device, include)
    result = ExitBenchResult(preset=preset, batch=batch, mode=mode, device=device,
                             flops=flops * (3 if mode == "train" else 1))
    with torch.no_grad() if mode == "inference" else torch.enable_grad():
        ref = outputs["eager"]().detach().float() if "eager" in outputs else None
        for name, fn in outputs.items():
            out = fn().detach().float()
            if ref is not None:
                diff = (out - ref).abs().max().item()
                result.max_abs_diff_vs_eager[name] = diff
                scale = ref.abs().max().item() + 1e-6
                if not diff <= 1e-3 * scale + 1e-4:
                    raise AssertionError(f"{preset} b{batch}: {name} disagrees with eager by {diff:.3e} (scale {scale:.3e})")
    timings = time_interleaved(impls, repeats=repeats)
    for name, t in timings.items():
        result.times_s[name] = t.median_s
        result.gflops[name] = result.flops / t.median_s / 1e9
        if matmul_peak_gflops:
            result.fraction_of_matmul_peak[name] = result.gflops[name] / matmul_peak_gflops
    for name, t in result.times_s.items():
        if "eager" in result.times_s:
            result.speedup_vs_eager[name] = result.times_s["eager"] / t
        if "compile" in result.times_s:
            result.speedup_vs_compile[name] = result.times_s["compile"] / t
    return result
