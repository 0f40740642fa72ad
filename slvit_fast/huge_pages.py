"""A module's parameters in 2 MiB pages (Linux transparent huge pages): the exit's cold-call latency.

Why: at batch 1 an exit runs right after its backbone prefix, which has evicted the exit's weights and,
worse, their address translations. With 4 KiB pages every page of weight the first call touches is a
TLB miss and, on a virtual machine, a nested page walk; resnet152-b1's 2.4 MB of weights are ~600 of
them. Measured on this project's VM (2 threads, the two alternating after each 30 ms resnet152 prefix,
three runs of 30-60 pairs): the resnet152-b1 exit took a median 1076-1179 us with its weights in 4 KiB
pages and 754-1009 us in 2 MiB pages (minimums 609-674 vs 508-515 us; warm, back to back: ~270 us
either way). A gain of 7-35%, not the whole cold-call cost: the rest is the caches themselves.

:func:`place_in_huge_pages` moves the storages of every CPU floating-point parameter of a module into one
fresh anonymous mapping advised ``MADV_HUGEPAGE`` (before anything touches it, so the kernel backs it
with 2 MiB pages when it has them). Nothing is copied behind the user's back afterwards: each
``Parameter`` object stays the same (optimizers, hooks and names are unaffected) and only its ``.data``
moves, with the same values, shape, strides and storage offset. Storage by storage: parameters that
shared one (tied or overlapping views) still do, and each moved storage is its own storage object the
size of the old one (a ``torch.save`` writes that, not the whole mapping). There is no second copy that
could go stale; a tensor obtained from ``param.data`` *before* the call no longer aliases the
parameter. The mapping lives as long as any moved storage. Where the system has no transparent huge
pages the call still moves the storages (harmless) and the report says no 2 MiB page was obtained.
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
    inference_tensors_left: int = 0  # parameters made under torch.inference_mode, not moved

    def __str__(self) -> str:
        left = (f"; {self.inference_tensors_left} inference-mode parameter(s) left where they were"
                if self.inference_tensors_left else "")
        if self.skipped:
            return f"parameters left where they were: {self.skipped}"
        return (f"{self.tensors} parameter(s), {self.bytes / 1e6:.2f} MB, moved into one mapping; "
                f"{self.huge_bytes / 1e6:.2f} MB of it in 2 MiB pages{left}")


def _movable_storages(module: nn.Module) -> tuple[dict[int, list[nn.Parameter]], int]:
    """CPU floating-point parameters grouped by the storage they view (storage address -> parameters),
    and how many were left out as inference tensors (made under ``torch.inference_mode``: they have no
    version counter, and replacing their ``.data`` would leave a tensor that claims to be an ordinary one
    without having one - every later ``_version`` read raises)."""
    seen, groups, inference = set(), {}, 0
    for p in module.parameters():
        if id(p) in seen or p.device.type != "cpu" or not p.dtype.is_floating_point:
            continue
        seen.add(id(p))
        if p.is_inference():
            inference += 1
            continue
        groups.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    return groups, inference


def _huge_bytes_of(start: int, end: int) -> int:
    """AnonHugePages of the memory region (smaps entry) [start, end) exactly; 0 when there is none (an
    entry that merely contains the range may hold other mappings' pages too)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo == start and hi == end
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def place_in_huge_pages(module: nn.Module) -> HugePageReport:
    """Move ``module``'s CPU floating-point parameters' storages into one mapping advised
    ``MADV_HUGEPAGE``, in place (see the module docstring). Returns a :class:`HugePageReport`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"place_in_huge_pages: expected an nn.Module, got {type(module).__name__}")
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return HugePageReport(skipped="this platform has no MADV_HUGEPAGE (Linux transparent huge pages)")
    groups, inference = _movable_storages(module)
    if not groups:
        why = ("its parameters were made under torch.inference_mode (inference tensors cannot be moved: "
               "build the module outside it)" if inference else "no floating-point parameters on the CPU")
        return HugePageReport(skipped=why, inference_tensors_left=inference)
    sizes = [group[0].untyped_storage().nbytes() for group in groups.values()]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += max(_ALIGN, -(-n // _ALIGN) * _ALIGN)
    span = -(-total // _HUGE) * _HUGE
    mm = mmap.mmap(-1, span + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = -torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() % _HUGE
    # advise only the aligned span, before the first touch: it becomes its own memory region (the
    # unadvised slack around it keeps it from merging with a neighbouring mapping's), backed by 2 MiB
    # pages as the copies below fault it in
    mm.madvise(mmap.MADV_HUGEPAGE, base, span)
    # (inference_mode off: moved parameters must stay ordinary tensors, trainable, whatever the caller's
    # mode; each frombuffer storage keeps the mapping alive)
    with torch.inference_mode(False), torch.no_grad():
        for (_, params), offset, n in zip(groups.items(), offsets, sizes):
            storage = torch.frombuffer(mm, dtype=torch.uint8, count=max(n, 1), offset=base + offset).untyped_storage()
            old = params[0].untyped_storage()
            if n:
                torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,)).copy_(
                    torch.empty(0, dtype=torch.uint8).set_(old, 0, (n,)))
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype).set_(storage, p.storage_offset(), p.size(), p.stride())
        start = torch.frombuffer(mm, dtype=torch.uint8, count=1, offset=base).data_ptr()
    return HugePageReport(tensors=sum(len(g) for g in groups.values()), bytes=total,
                          huge_bytes=_huge_bytes_of(start, start + span), inference_tensors_left=inference)
