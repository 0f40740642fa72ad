"""A module's parameters in 2 MiB pages (Linux transparent huge pages): the exit's cold-call latency.

Why: at batch 1 an exit runs right after its backbone prefix, which has evicted the exit's weights and,
worse, their address translations. With 4 KiB pages every page of weight the first call touches is a
TLB miss and, on a virtual machine, a nested page walk; resnet152-b1's 2.4 MB of weights are ~600 of
them. Measured on this project's VM (2 threads, the two alternating after each 30 ms resnet152 prefix,
three runs of 30-60 pairs): the resnet152-b1 exit took a median 1076-1179 us with its weights in 4 KiB
pages and 754-1009 us in 2 MiB pages (minimums 609-674 vs 508-515 us; warm, back to back: ~270 us
either way). A gain of 7-35%, not the whole cold-call cost: the rest is the caches themselves.

:func:`place_in_huge_pages` moves every CPU floating-point parameter of a module into one fresh anonymous
mapping advised ``MADV_HUGEPAGE`` (before anything touches it, so the kernel backs it with 2 MiB pages
when it has them). Nothing is copied behind the user's back afterwards: each ``Parameter`` object stays
the same (optimizers, hooks and names are unaffected) and only its ``.data`` becomes a view of the
mapping with the same values, shape and strides, so there is no second copy that could go stale. A
tensor obtained from ``param.data`` *before* the call no longer aliases the parameter. The mapping lives
as long as any of those views. Where the system has no transparent huge pages the call still moves the
tensors (harmless) and the report says no 2 MiB page was obtained.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["place_in_huge_pages", "HugePageReport"]

_HUGE = 2 << 20
_ALIGN = 64  # bytes: every tensor starts on a cache line (the fused kernels' vector loads)


@dataclass
class HugePageReport:
    """What :func:`place_in_huge_pages` did: tensors moved, their bytes, the mapping's bytes backed by
    2 MiB pages (from ``/proc/self/smaps``; 0 when the system gave none) and why nothing was moved."""

    tensors: int = 0
    bytes: int = 0
    huge_bytes: int = 0
    skipped: str | None = None

    def __str__(self) -> str:
        if self.skipped:
            return f"parameters left where they were: {self.skipped}"
        return (f"{self.tensors} parameter(s), {self.bytes / 1e6:.2f} MB, moved into one mapping; "
                f"{self.huge_bytes / 1e6:.2f} MB of it in 2 MiB pages")


def _movable(module: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if id(p) in seen or p.device.type != "cpu" or not p.dtype.is_floating_point:
            continue
        seen.add(id(p))
        out.append(p)
    return out


def _huge_bytes_of(address: int) -> int:
    """AnonHugePages of the mapping that starts at ``address`` (0 when unknown)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    start, end = (int(v, 16) for v in head.split("-"))
                    inside = start <= address < end
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def place_in_huge_pages(module: nn.Module) -> HugePageReport:
    """Move ``module``'s CPU floating-point parameters into one mapping advised ``MADV_HUGEPAGE``, in
    place (see the module docstring). Returns a :class:`HugePageReport`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"place_in_huge_pages: expected an nn.Module, got {type(module).__name__}")
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return HugePageReport(skipped="this platform has no MADV_HUGEPAGE (Linux transparent huge pages)")
    params = _movable(module)
    if not params:
        return HugePageReport(skipped="no floating-point parameters on the CPU")
    # where each tensor goes: same strides as now when it is dense (channels_last weights stay so)
    layouts, total = [], 0
    for p in params:
        like = torch.empty_like(p, memory_format=torch.preserve_format, device="meta")
        layouts.append((total, like.size(), like.stride()))
        total += -(-p.numel() * p.element_size() // _ALIGN) * _ALIGN
    size = -(-total // _HUGE) * _HUGE + _HUGE  # + one page of slack to align the start
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the page faults below then take 2 MiB pages
    raw = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive as long as any view of it
    base = -raw.data_ptr() % _HUGE
    with torch.no_grad():
        for p, (offset, shape, stride) in zip(params, layouts):
            start = base + offset
            flat = raw[start:start + p.numel() * p.element_size()].view(p.dtype)
            view = flat.as_strided(shape, stride)
            view.copy_(p.detach())
            p.data = view
    return HugePageReport(tensors=len(params), bytes=total, huge_bytes=_huge_bytes_of(raw.data_ptr() + base))
