"""The exit microbenchmark: our backends vs eager PyTorch vs ``torch.compile`` of the reference.

For one preset, batch size and mode it builds the implementations, checks they agree with the
reference (a benchmark of a wrong kernel is worthless), then times them interleaved.

* ``eager``   - the torch backend (the reference ops, eager mode);
* ``compile`` - ``torch.compile`` (inductor) of the same reference function;
* optional anchors (:mod:`slvit_fast.bench.anchors`, inference only): ``max-autotune`` (torch.compile
  with ``mode="max-autotune"``) and ``onnxruntime`` (the reference exported to ONNX, run by ONNX
  Runtime), when requested and installed; an anchor that cannot be built is skipped with its reason;
* every fused backend usable here (``cpu`` on this machine; ``triton``/``cuda`` on a GPU).

Modes: ``inference`` (``torch.inference_mode``, eval) and ``train`` (forward + backward of the exit
with respect to its parameters, as in classifier-wise training).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .. import backends
from ..accounting import slvit_flops
from ..config import SLViTConfig
from ..slvit_exit import SLViTExit
from . import anchors as anchor_impls
from .timing import time_interleaved

FUSED_BACKENDS = ("cpu", "triton", "cuda")
ANCHORS = ("max-autotune", "onnxruntime")  # optional columns; "eager" and "compile" are always built


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
    speedup_vs_max_autotune: dict[str, float] = field(default_factory=dict)
    speedup_vs_onnxruntime: dict[str, float] = field(default_factory=dict)
    # seconds of the first call (torch.compile compiles/autotunes there) plus ONNX export + session creation
    setup_s: dict[str, float] = field(default_factory=dict)
    anchors_skipped: dict[str, str] = field(default_factory=dict)  # requested anchor -> why it is absent
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


@dataclass
class BuiltImpls:
    timed: dict[str, Callable[[], object]]  # what the rounds time (forward, or forward+backward)
    outputs: dict[str, Callable[[], torch.Tensor]]  # output-producing calls for the agreement check
    flops: float  # forward FLOPs per call
    setup_s: dict[str, float] = field(default_factory=dict)  # build-time cost (ONNX export) per impl
    skipped: dict[str, str] = field(default_factory=dict)  # requested anchor -> reason it was not built


def _make_exit(preset: "str | SLViTConfig") -> SLViTExit:
    if isinstance(preset, SLViTConfig):  # any config (tests use tiny ones)
        return SLViTExit(preset, backend="torch")
    return SLViTExit.from_preset(preset, backend="torch")


def preset_label(preset: "str | SLViTConfig") -> str:
    return preset if isinstance(preset, str) else "custom"


def build(preset: "str | SLViTConfig", batch: int, mode: str, device: str = "cpu", include: tuple[str, ...] | None = None,
          seed: int = 0, anchors: tuple[str, ...] = ()) -> BuiltImpls:
    """Every implementation of one benchmark case: eager, compile, the requested ``anchors``, fused backends."""
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    unknown = [a for a in anchors if a not in ANCHORS]
    if unknown:
        raise ValueError(f"unknown anchor(s) {unknown}; valid: {list(ANCHORS)}")
    torch._dynamo.reset()  # the compiled anchors of earlier cases must not use up dynamo's recompile limit
    torch.manual_seed(seed)
    base = _make_exit(preset).to(device)
    base.train(mode == "train")
    x, extra = _inputs(base, batch, device, seed)
    flops = float(slvit_flops(base.config)) * batch
    built = BuiltImpls({}, {}, flops)
    wanted = list(anchors)
    if mode == "train" and wanted:
        # ONNX Runtime has no training here, and max-autotune's forward+backward autotuning is the slow
        # part of a run: the training step is compared with eager, compile and ours only.
        built.skipped.update({a: "anchors are measured in inference mode only" for a in wanted})
        wanted = []
    if "onnxruntime" in wanted and (reason := anchor_impls.onnxruntime_unavailable_reason()) is not None:
        built.skipped["onnxruntime"] = reason
        wanted.remove("onnxruntime")
    if "onnxruntime" in wanted and device != "cpu":
        built.skipped["onnxruntime"] = f"the ONNX Runtime anchor runs the CPUExecutionProvider only (device {device})"
        wanted.remove("onnxruntime")
    names = ["eager", "compile", *wanted, *usable_fused_backends(x)]
    if include is not None:
        names = [n for n in names if n in include]

    modules: dict[str, SLViTExit] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name in names:
        m = copy.deepcopy(base)
        modules[name] = m
        if name in anchor_impls.COMPILE_MODES:
            calls[name] = anchor_impls.compiled_reference(m, x, extra, anchor_impls.COMPILE_MODES[name])
        elif name == "onnxruntime":
            t0 = time.perf_counter()
            try:
                calls[name] = anchor_impls.onnxruntime_exit(m, x, extra)
            except Exception as e:  # an export failure is a finding to report, not a reason to lose the run
                built.skipped[name] = f"export/session failed: {type(e).__name__}: {str(e)[:300]}"
                del modules[name]
                continue
            built.setup_s[name] = time.perf_counter() - t0
        else:
            m.backend = "torch" if name == "eager" else name
            calls[name] = lambda m=m: m(x, extra)

    if mode == "inference":
        def timed(fn):
            def run():
                with torch.inference_mode():
                    return fn()
            return run
        built.timed = {n: timed(f) for n, f in calls.items()}
        built.outputs = built.timed
    else:
        def step(fn):
            def run():
                out = fn()
                out.sum().backward()  # gradients accumulate: the same work every call
                return out
            return run
        built.timed = {n: step(f) for n, f in calls.items()}
        built.outputs = calls
    return built


def build_impls(preset: str, batch: int, mode: str, device: str = "cpu", include: tuple[str, ...] | None = None,
                seed: int = 0, anchors: tuple[str, ...] = ()
                ) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], torch.Tensor]], float]:
    """(timed callables, output-producing callables for the agreement check, forward FLOPs per call)."""
    b = build(preset, batch, mode, device, include, seed, anchors)
    return b.timed, b.outputs, b.flops


# ratio field of ExitBenchResult for each reference implementation ("how many times faster than X")
RATIO_FIELDS = {"eager": "speedup_vs_eager", "compile": "speedup_vs_compile",
                "max-autotune": "speedup_vs_max_autotune", "onnxruntime": "speedup_vs_onnxruntime"}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_exit_bench(preset: "str | SLViTConfig", batch: int, mode: str = "inference", device: str = "cpu", repeats: int = 15,
                   matmul_peak_gflops: float | None = None, include: tuple[str, ...] | None = None,
                   anchors: tuple[str, ...] = ()) -> ExitBenchResult:
    built = build(preset, batch, mode, device, include, anchors=anchors)
    result = ExitBenchResult(preset=preset_label(preset), batch=batch, mode=mode, device=device,
                             flops=built.flops * (3 if mode == "train" else 1), anchors_skipped=dict(built.skipped))
    with torch.no_grad() if mode == "inference" else torch.enable_grad():
        ref = built.outputs["eager"]().detach().float() if "eager" in built.outputs else None
        for name, fn in built.outputs.items():
            _sync()
            t0 = time.perf_counter()
            out = fn().detach().float()  # first call: torch.compile compiles (and autotunes) here
            _sync()
            result.setup_s[name] = built.setup_s.get(name, 0.0) + time.perf_counter() - t0
            if ref is not None:
                diff = (out - ref).abs().max().item()
                result.max_abs_diff_vs_eager[name] = diff
                scale = ref.abs().max().item() + 1e-6
                if not diff <= 1e-3 * scale + 1e-4:
                    raise AssertionError(f"{preset} b{batch}: {name} disagrees with eager by {diff:.3e} (scale {scale:.3e})")
    timings = time_interleaved(built.timed, repeats=repeats, round_warmup=1)  # steady state: timing.py
    for name, t in timings.items():
        result.times_s[name] = t.median_s
        result.gflops[name] = result.flops / t.median_s / 1e9
        if matmul_peak_gflops:
            result.fraction_of_matmul_peak[name] = result.gflops[name] / matmul_peak_gflops
    for anchor, field_name in RATIO_FIELDS.items():
        if anchor in result.times_s:
            ratios = getattr(result, field_name)
            for name, t in result.times_s.items():
                ratios[name] = result.times_s[anchor] / t
    return result
