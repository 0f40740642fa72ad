"""Counting kernel launches: the product's promise is few launches per exit.

``count_kernel_launches()`` counts launches of our own kernels (Triton and native extension kernels),
which every backend reports through :func:`record_launches` right where it launches them. On a CUDA
device it also counts every other CUDA kernel launched in the block (e.g. eager PyTorch's) through
the torch profiler when ``include_torch=True``, so eager and fused paths can be compared.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

_local = threading.local()


@dataclass
class LaunchCounter:
    """Result of :func:`count_kernel_launches`: ``count`` total, ``by_kernel`` per kernel name."""

    by_kernel: Counter = field(default_factory=Counter)
    torch_kernels: int = 0  # CUDA kernels seen by the torch profiler (include_torch=True on CUDA)

    @property
    def count(self) -> int:
        return sum(self.by_kernel.values()) + self.torch_kernels


def _active() -> list[LaunchCounter]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def record_launches(name: str, n: int = 1) -> None:
    """Called by backends each time they launch ``n`` kernels named ``name``."""
    for counter in _active():
        counter.by_kernel[name] += n


@contextlib.contextmanager
def count_kernel_launches(include_torch: bool = False) -> Iterator[LaunchCounter]:
    """Context manager; ``.count`` is the number of GPU kernel launches made inside it.

    >>> with count_kernel_launches() as launches:
    ...     exit_module(features)
    >>> launches.count
    """
    counter = LaunchCounter()
    stack = _active()
    stack.append(counter)
    prof = None
    if include_torch:
        import torch

        if torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.__enter__()
    try:
        yield counter
    finally:
        stack.remove(counter)
        if prof is not None:
            prof.__exit__(None, None, None)
            ours = set(counter.by_kernel)
            counter.torch_kernels = sum(
                1 for e in prof.events() if e.device_type.name == "CUDA" and e.name not in ours
            )
