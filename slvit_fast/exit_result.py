"""``EarlyExitResult``: what an early-exit run answers, per sample and per exit.

Its own module because two places build it - :func:`slvit_fast.policies.apply` (brute force on every
exit's outputs) and :meth:`slvit_fast.MultiExitNetwork.early_exit` (real batch compaction) - and
``multi_exit`` imports ``policies``, so the type sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["EarlyExitResult"]


@dataclass
class EarlyExitResult:
    """What :meth:`MultiExitNetwork.early_exit` and :func:`slvit_fast.policies.apply` return.

    ``outputs`` (B, K) in input order; ``exit_index`` (B,) - ``num_exits`` means the final output;
    ``counts[i]`` samples answered by exit i (``counts[-1]``: the final output); ``evaluated[i]`` the
    number of samples exit i was run on (the final entry: samples that reached the backbone's end);
    ``mean_flops`` / ``flops_speedup`` from ``exit_costs`` and ``backbone_flops`` when those are known.
    """

    outputs: Tensor
    exit_index: Tensor
    counts: list[int]
    evaluated: list[int] = field(default_factory=list)
    exit_costs: list[float] | None = None  # FLOPs per sample answered at each exit (last: the final output)
    backbone_flops: float | None = None    # FLOPs per sample of the plain backbone (no exits)
    # counts (exit_costs, backbone_flops) when first needed: early_exit leaves the FLOP count (a fake-tensor
    # run of the backbone, cached per input size) until someone asks for mean_flops
    cost_source: Callable[[], tuple[list[float], float]] | None = field(default=None, repr=False, compare=False)

    def _costs(self) -> list[float] | None:
        if self.exit_costs is None and self.cost_source is not None:
            costs, backbone = self.cost_source()
            self.exit_costs, self.backbone_flops = list(costs), float(backbone)
        return self.exit_costs

    @property
    def mean_flops(self) -> float | None:
        """Mean FLOPs per sample: ``exit_costs[exit_index]`` averaged over the batch (NaN for an empty
        batch; None when the costs are unknown). ``net.early_exit`` fills the costs from
        :func:`slvit_fast.accounting.summary` (``cost_flops``: backbone up to the exit's compaction
        point plus every exit run so far). With a :class:`~slvit_fast.policies.Deadline` this counts
        the exit that answered, not the one that was interrupted."""
        if self._costs() is None:
            return None
        if self.batch_size == 0:
            return float("nan")
        costs = torch.tensor(self.exit_costs, dtype=torch.float64)
        return float(costs[self.exit_index.cpu()].mean())

    @property
    def flops_speedup(self) -> float | None:
        """``backbone_flops / mean_flops``: how many times fewer FLOPs than running the plain backbone."""
        mean = self.mean_flops
        if mean is None or self.backbone_flops is None:
            return None
        return self.backbone_flops / mean if mean > 0 else float("nan")

    @property
    def batch_size(self) -> int:
        return int(self.exit_index.shape[0])

    @property
    def remaining(self) -> list[int]:
        """Samples still in the batch after each exit (last entry: after the final output, i.e. 0)."""
        left, out = self.batch_size, []
        for c in self.counts:
            left -= c
            out.append(left)
        return out
