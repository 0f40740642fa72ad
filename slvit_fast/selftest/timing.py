"""Inference timing of the exit per backend vs eager and the torch.compile anchors, interleaved.

Implementations take turns in rotating order (machine noise hits all alike); each round times
``inner`` calls; the median per-call time is kept. Clock: CUDA events on CUDA (GPU time between two
events around the calls, no host sync inside), ``time.perf_counter`` on CPU.

Anchors (all of :func:`slvit_fast.reference.slvit_exit`, specialized to the shape, ``dynamic=False``):
``compile`` (inductor default), ``reduce-overhead`` (CUDA graphs; CUDA only) and ``max-autotune``.
Their first call (compilation, autotuning, graph capture) is reported separately as ``setup_s``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..bench.anchors import compiled_reference
from ..slvit_exit import SLViTExit
from .correctness import matmul_precision, randomize_
from .tolerance import DTYPES


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _round_seconds(fn: Callable[[], object], inner: int, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_interleaved(impls: dict[str, Callable[[], object]], device: str, repeats: int = 7,
                     target_round_s: float = 0.02, warmup: int = 2) -> dict[str, float]:
    """Median per-call seconds of each (already compiled) zero-argument callable."""
    names = list(impls)
    for name in names:
        for _ in range(warmup):
            impls[name]()
    _sync(device)
    slowest = max(_round_seconds(impls[n], 1, device) for n in names)
    inner = max(1, min(100, int(target_round_s / max(slowest, 1e-6))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_round_seconds(impls[name], inner, device))
    return {n: statistics.median(s) for n, s in samples.items()}


@dataclass
class TimingCase:
    """One preset x dtype x batch: median seconds per implementation, first-call seconds of the anchors."""

    preset: str
    dtype: str
    batch: int
    seconds: dict[str, float] = field(default_factory=dict)
    setup_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # implementation -> why it could not be timed

    def speedup(self, impl: str, vs: str) -> float | None:
        a, b = self.seconds.get(vs), self.seconds.get(impl)
        return None if a is None or b is None or b <= 0 else a / b

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speedup_vs"] = {vs: {impl: self.speedup(impl, vs) for impl in self.seconds}
                           for vs in self.seconds if vs == "eager" or vs in ANCHOR_MODES}
        return d


ANCHOR_MODES = {"compile": None, "reduce-overhead": "reduce-overhead", "max-autotune": "max-autotune"}


def time_case(preset: str, config, dtype_name: str, batch: int, backends: list[str], anchors: list[str],
              device: str, repeats: int = 7, seed: int = 0) -> TimingCase:
    """Time ``backends`` (the torch backend is reported as ``eager``) and the compile ``anchors``."""
    dtype, precision = DTYPES[dtype_name]
    case = TimingCase(preset, dtype_name, batch)
    torch._dynamo.reset()  # keep dynamo's per-code-object recompile limit for this case's anchors
    base = randomize_(SLViTExit(config, backend="torch"), seed).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, config.in_channels, *config.feature_size, generator=g).to(device=device, dtype=dtype)
    extra = None
    if config.extra_tokens:
        extra = torch.randn(batch, config.extra_tokens, config.extra_dim, generator=g).to(device=device, dtype=dtype)
    impls: dict[str, Callable[[], object]] = {}
    with matmul_precision(precision), torch.no_grad():
        for name in backends:
            m = copy.deepcopy(base)
            m.backend = name
            impls["eager" if name == "torch" else name] = (lambda m=m: m(x, extra))
        for anchor in anchors:
            fn = compiled_reference(base, x, extra, ANCHOR_MODES[anchor])
            _sync(device)
            t0 = time.perf_counter()
            try:
                fn()  # compiles (and autotunes / captures the CUDA graph) here
                fn()
            except Exception as e:  # an anchor that fails to compile is reported, the self-test goes on
                case.errors[anchor] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            _sync(device)
            case.setup_s[anchor] = time.perf_counter() - t0
            impls[anchor] = fn
        for name, fn in list(impls.items()):
            if name in ANCHOR_MODES:
                continue
            try:
                fn()
            except Exception as e:
                case.errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
                del impls[name]
        if impls:
            case.seconds = time_interleaved(impls, device, repeats=repeats)
    return case
