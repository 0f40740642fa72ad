"""Interleaved timing: implementations take turns, so machine noise hits all of them alike.

Absolute times on a shared machine drift; ratios measured in one interleaved run do much less. Each
implementation is warmed up (torch.compile compiles there), then ``repeats`` rounds run every
implementation in a rotating order, each timed over ``inner`` calls; the median per-call time is kept.

``round_warmup`` untimed calls open each round (steady-state timing): on this kind of VM the first call
after another implementation's round refills caches and TLBs at a cost that belongs to the switch, not
to either implementation (measured: a 0.27 ms resnet152-b1 exit call took 1.1-1.3 ms after 10 ms of
other work or idling, 4.7 ms after 50 ms), so without it a fast implementation's rounds carry most of
that cost per call. Measurements that mean the cold call (the exit right after its backbone prefix)
leave it at 0.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class Timing:
    name: str
    median_s: float
    min_s: float
    samples: list[float]


def time_interleaved(impls: dict[str, Callable[[], object]], repeats: int = 15, inner: int | None = None,
                     warmup: int = 3, target_round_s: float = 0.05, round_warmup: int = 0) -> dict[str, Timing]:
    """Median per-call seconds of each zero-argument callable, timed in rotating order."""
    names = list(impls)
    for name in names:
        for _ in range(warmup):
            impls[name]()
    _sync()
    if inner is None:  # pick the inner count from the slowest implementation so each round is ~target
        slowest = 0.0
        for name in names:
            t0 = time.perf_counter()
            impls[name]()
            _sync()
            slowest = max(slowest, time.perf_counter() - t0)
        inner = max(1, min(200, int(target_round_s / max(slowest, 1e-6))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = impls[name]
            for _ in range(round_warmup):
                fn()
            _sync()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {n: Timing(n, statistics.median(s), min(s), s) for n, s in samples.items()}


def matmul_gflops(n: int = 1536, repeats: int = 15, dtype: torch.dtype = torch.float32) -> float:
    """Measured large-matrix-multiply throughput of this machine (GFLOP/s): the roof for our GEMMs.

    The *fastest* round, not the median: the roof is what the machine can do, and a noisy moment
    while it is measured must not lower the bar the "fraction of matmul peak" figures are held to.
    """
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=2)["mm"]
    return 2 * n**3 / t.min_s / 1e9
