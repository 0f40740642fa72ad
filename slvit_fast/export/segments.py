"""Cutting a backbone into the programs of an early-exit pipeline.

``MultiExitNetwork.early_exit`` removes exited samples at each exit's *compaction point*: a module
whose parent is the backbone (taken to be a chain of its children) or an ``nn.Sequential`` that is
itself such a point. Those are exactly the places where the backbone's forward can be cut, so an
exported pipeline has one **segment** per compaction point - the chain of modules after the previous
cut up to and including this one - and a **tail**: the backbone itself with every module up to the
last cut replaced by ``nn.Identity``, so whatever its ``forward`` does after the last cut (e.g.
``torch.flatten`` before the classifier of torchvision's ResNet) is kept as it is.

A segment also returns the outputs of the modules its exits read when those lie inside it (an exit on
``layer2.0.conv2`` is compacted at ``layer2.0``: the segment returns both).

Every cut is checked numerically against the backbone on the example input (outputs at each cut and
the final output): a backbone whose ``forward`` is not a chain of these modules gives a clear error
instead of a silently different program.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn


class SegmentationError(ValueError):
    """The backbone cannot be cut into a chain of programs at the exits' compaction points."""


class Segment(nn.Module):
    """The modules between two cuts, run in order; returns (output, *captured exit features)."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], captures: Sequence[tuple[str, nn.Module]]):
        super().__init__()
        self.paths = [p for p, _ in modules]
        self.chain = nn.ModuleList(m for _, m in modules)
        self.capture_paths = [p for p, _ in captures]
        self._taps = [m for _, m in captures]  # a plain list: these are submodules of ``chain`` already

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        # hooks live for one call and write to a local: nothing tensor-valued is stored on the module
        # (torch.export wants no such attributes), and copies of the segment stay independent
        captured: dict[int, Tensor] = {}

        def tap(i: int):
            def hook(_module, _inputs, output):
                captured[i] = output
            return hook

        handles = [m.register_forward_hook(tap(i)) for i, m in enumerate(self._taps)]
        try:
            for m in self.chain:
                x = m(x)
        finally:
            for h in handles:
                h.remove()
        return (x, *(captured[i] for i in range(len(self._taps))))


class Tail(nn.Module):
    """The backbone after the last cut: its own forward with the modules before the cut as identities."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def _chain(backbone: nn.Module, cuts: set[str]) -> list[str]:
    """Module paths whose outputs feed each other in order, fine enough that every cut is one of them."""
    def expand(prefix: str, module: nn.Module) -> list[str]:
        out = []
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if any(c.startswith(path + ".") for c in cuts):
                if not isinstance(child, nn.Sequential):
                    inner = sorted(c for c in cuts if c.startswith(path + "."))
                    raise SegmentationError(
                        f"cannot cut the backbone at {inner}: {path!r} is a {type(child).__name__}, not an "
                        "nn.Sequential, so its forward is not known to be a chain of its children; attach the "
                        "exits (or compact_at=) at a module whose parents are the backbone or nn.Sequential")
                out += expand(path, child)
            else:
                out.append(path)
        return out

    return expand("", backbone)


def split_backbone(backbone: nn.Module, cuts: Sequence[str], captures: Sequence[Sequence[str]]
                   ) -> tuple[list[Segment], Tail]:
    """Segments ending at each of ``cuts`` (in forward order) and the tail; ``captures[k]`` are module
    paths inside segment k whose outputs it also returns. Works on a deep copy of ``backbone``."""
    backbone = copy.deepcopy(backbone).eval()
    chain = _chain(backbone, set(cuts))
    position = {p: i for i, p in enumerate(chain)}
    segments, start = [], 0
    for cut, caps in zip(cuts, captures):
        end = position[cut] + 1
        if end <= start:
            raise SegmentationError(f"compaction points out of order at {cut!r}")
        paths = chain[start:end]
        for c in caps:
            if not any(c == p or c.startswith(p + ".") for p in paths):
                raise SegmentationError(f"exit input {c!r} is not computed between the cuts before {cut!r}")
        segments.append(Segment([(p, _get(backbone, p)) for p in paths], [(c, _get(backbone, c)) for c in caps]))
        start = end
    tail_backbone = copy.deepcopy(backbone)
    for p in chain[:start]:
        _set(tail_backbone, p, nn.Identity())
    return segments, Tail(tail_backbone)


@torch.no_grad()
def check_split(backbone: nn.Module, segments: Sequence[Segment], tail: Tail, cuts: Sequence[str],
                example: Tensor) -> None:
    """Raise :class:`SegmentationError` unless segments + tail reproduce ``backbone`` on ``example``."""
    seen: dict[str, Any] = {}

    def record(cut: str):
        def hook(_module, _inputs, output):
            seen.setdefault(cut, output)
        return hook

    handles = [backbone.get_submodule(c).register_forward_hook(record(c)) for c in cuts]
    try:
        expected = backbone(example)
    finally:
        for h in handles:
            h.remove()
    x = example
    try:
        for cut, seg in zip(cuts, segments):
            x = seg(x)[0]
            _same(x, seen.get(cut), f"the output of {cut!r}")
        final = tail(x)
    except SegmentationError:
        raise
    except Exception as e:  # the chain did not even run: forward is not a chain of these modules
        raise SegmentationError(
            f"the backbone ({type(backbone).__name__}) cannot be cut at {list(cuts)}: running its modules in "
            f"order failed ({type(e).__name__}: {e}); its forward is not a chain of its children") from e
    _same(final, expected, "the final output")


def _same(ours: Any, expected: Any, what: str) -> None:
    if not (isinstance(ours, Tensor) and isinstance(expected, Tensor) and ours.shape == expected.shape
            and torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)):
        raise SegmentationError(
            f"the backbone cannot be cut into a chain of its modules: {what} computed segment by segment differs "
            "from the backbone's own forward (it does more than run its children in order before this point)")


__all__ = ["Segment", "Tail", "SegmentationError", "split_backbone", "check_split"]
