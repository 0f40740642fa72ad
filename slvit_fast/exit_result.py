"""``EarlyExitResult``: what an early-exit run answers, per sample and per exit.

Its own module because two places build it - :func:`slvit_fast.policies.apply` (brute force on every
exit's outputs) and :meth:`slvit_fast.MultiExitNetwork.early_exit` (real batch compaction) - and
``multi_exit`` imports ``policies``, so the type sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["EarlyExitResult"]


@dataclass
class EarlyExitResult:
    """What :meth:`MultiExitNetwork.early_exit` and :func:`slvit_fast.policies.apply` return.

    ``outputs`` (B, K) in input order; ``exit_index`` (B,) - ``num_exits`` means the final output;
    ``counts[i]`` samples answered by exit i (``counts[-1]``: the final output); ``evaluated[i]`` the
    number of samples exit i was run on (the final entry: samples that reached the backbone's end).
    """

    outputs: Tensor
    exit_index: Tensor
    counts: list[int]
    evaluated: list[int] = field(default_factory=list)

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
