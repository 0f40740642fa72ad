"""Exit thresholds calibrated on labelled validation data.

* :func:`calibrate_budget` - budgeted batch classification (seeds/004 Algorithm 1, MSDNet's
  procedure): the most accurate :class:`~slvit_fast.policies.MaxSoftmax` thresholds whose mean FLOPs
  per sample fit a budget.
* :func:`collect_outputs` - every exit's output over a loader (``net(x)`` batch by batch), the data
  every calibration and :mod:`slvit_fast.analysis` works on.

The names are also importable from :mod:`slvit_fast.policies`, where they used to live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from .policies import MaxSoftmax, apply

__all__ = ["calibrate_budget", "BudgetCandidate", "BudgetCalibration", "collect_outputs", "Collected"]


class Collected(NamedTuple):
    outputs: list[Tensor]  # every early exit, then the final output; rows in loader order
    labels: Tensor
    example: Any           # the first batch's input (its per-sample size prices the exits)


def collect_outputs(net: Any, loader: Iterable, what: str = "collect_outputs") -> Collected:
    """Run ``net(x)`` (eval mode, no grad) over ``(x, y)`` batches; ``what`` names the caller in errors."""
    outs: list[list[Tensor]] = []
    labels = []
    example = None
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0], batch[1]
                if example is None:
                    example = x
                o = net(x)
                outs.append([t.detach() for t in o])
                labels.append(torch.as_tensor(y))
    finally:
        net.train(was_training)
    if not outs:
        raise ValueError(f"{what}: the validation loader is empty")
    cols = [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]
    return Collected(cols, torch.cat(labels), example)


@dataclass
class BudgetCandidate:
    """One exit distribution of Algorithm 1: planned exit fractions ``q``, the thresholds, and what
    they give on the validation set (realized exit fractions, mean FLOPs per sample, accuracy)."""

    p: float
    q: list[float]
    thresholds: list[float | None]
    exit_fractions: list[float]
    expected_flops: float
    accuracy: float

    def policy(self) -> MaxSoftmax:
        return MaxSoftmax(self.thresholds)


@dataclass
class BudgetCalibration:
    candidates: list[BudgetCandidate]
    best: BudgetCandidate | None  # most accurate candidate within the budget (None: none fits)
    budget_flops: float
    exit_costs: list[float]  # FLOPs a sample pays when it leaves at each exit (last: final output)

    @property
    def thresholds(self) -> list[float | None] | None:
        return None if self.best is None else self.best.thresholds


def _default_exit_costs(net: Any, example: Any) -> list[float]:
    """FLOPs of a sample leaving at each exit (then the final output) at the example's input size."""
    from .accounting import summary

    xs = example if isinstance(example, (tuple, list)) else (example,)
    return [r.cost_flops for r in summary(net, [tuple(t.shape[1:]) for t in xs]).rows]


def calibrate_budget(
    net: Any,
    val_loader: Any,
    budget_flops: float,
    iterations: int = 40,
    base: float = 20.0,
    exit_costs: Sequence[float] | None = None,
) -> BudgetCalibration:
    """Thresholds for budgeted batch classification (seeds/004 Algorithm 1, MSDNet's procedure).

    For p = 1..``iterations``, the exit distribution ``q_k ∝ (p / base)^k`` (k = 1..n over the n early
    exits and the final output) says which fraction of the validation samples should leave at each
    exit; going through the exits in order, the ``q_k · m`` remaining samples with the highest max-softmax
    confidence exit at k and the threshold is the lowest of their confidences. Each candidate is then
    evaluated on the validation set with :class:`MaxSoftmax` (accuracy, realized mean FLOPs per sample).
    ``budget_flops`` is the budget per sample (mean over the batch); ``best`` is the most accurate
    candidate whose expected FLOPs fit it.

    ``val_loader`` yields ``(x, y)`` batches (``x`` a tensor or tuple of tensors). ``exit_costs`` (FLOPs
    of a sample leaving at each exit, then at the final output) default to
    :func:`slvit_fast.accounting.summary` at the loader's input size.
    """
    budget_flops = float(budget_flops)
    if not math.isfinite(budget_flops) or budget_flops <= 0:
        raise ValueError(f"calibrate_budget: budget_flops must be a positive finite number, got {budget_flops}")
    if iterations < 1 or base <= 0:
        raise ValueError("calibrate_budget: iterations >= 1 and base > 0 required")
    outputs, labels, example = collect_outputs(net, val_loader, "calibrate_budget")
    n_exits = len(outputs) - 1
    m = labels.shape[0]
    if exit_costs is None:
        exit_costs = _default_exit_costs(net, example)
    exit_costs = [float(c) for c in exit_costs]
    if len(exit_costs) != n_exits + 1:
        raise ValueError(f"calibrate_budget: {len(exit_costs)} exit costs for {n_exits + 1} outputs")
    conf = [torch.softmax(o.float(), dim=1).amax(dim=1) for o in outputs[:-1]]
    cost_t = torch.tensor(exit_costs, dtype=torch.float64)
    candidates = []
    for p in range(1, iterations + 1):
        ratio = p / base
        q = torch.tensor([ratio ** k for k in range(1, n_exits + 2)], dtype=torch.float64)
        q = (q / q.sum()).tolist()
        eligible = torch.ones(m, dtype=torch.bool)
        thresholds: list[float | None] = []
        for k in range(n_exits):
            quota = int(round(q[k] * m))
            cand = eligible.nonzero().squeeze(1)
            if quota <= 0 or cand.numel() == 0:
                thresholds.append(None)
                continue
            c = conf[k][cand]
            top = c.topk(min(quota, cand.numel())).indices
            thresholds.append(float(c[top].min()))
            eligible[cand[top]] = False
        res = apply(MaxSoftmax(thresholds), outputs)
        acc = float((res.outputs.argmax(dim=1) == labels).float().mean())
        flops = float(cost_t[res.exit_index].mean())
        frac = [c / m for c in res.counts]
        candidates.append(BudgetCandidate(ratio, q, thresholds, frac, flops, acc))
    fitting = [c for c in candidates if c.expected_flops <= budget_flops]
    best = max(fitting, key=lambda c: (c.accuracy, -c.expected_flops)) if fitting else None
    return BudgetCalibration(candidates, best, budget_flops, exit_costs)
