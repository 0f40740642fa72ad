"""Exit thresholds calibrated on labelled validation data.

* :func:`calibrate_budget` - budgeted batch classification (seeds/004 Algorithm 1, MSDNet's
  procedure): the most accurate :class:`~slvit_fast.policies.MaxSoftmax` thresholds whose mean FLOPs
  per sample fit a budget.
* :func:`calibrate_fractions` - thresholds that send given fractions of the samples out at each exit.
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

__all__ = ["calibrate_budget", "BudgetCandidate", "BudgetCalibration", "calibrate_fractions", "FractionCalibration",
           "collect_outputs", "Collected"]


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


def _confidences(outputs: Sequence[Tensor]) -> list[Tensor]:
    """Max-softmax confidence of every sample at every early exit."""
    return [torch.softmax(o.float(), dim=1).amax(dim=1) for o in outputs[:-1]]


def _thresholds_for(conf: Sequence[Tensor], q: Sequence[float]) -> list[float | None]:
    """MaxSoftmax thresholds that send fraction ``q[k]`` of the samples out at exit k: going through the
    exits in order, the ``q[k] * m`` most confident samples not yet out leave at k, and its threshold
    is the lowest of their confidences (None: nobody leaves there). Ties can take a few more."""
    m = conf[0].shape[0]
    eligible = torch.ones(m, dtype=torch.bool)
    thresholds: list[float | None] = []
    for k, c_all in enumerate(conf):
        quota = int(round(q[k] * m))
        cand = eligible.nonzero().squeeze(1)
        if quota <= 0 or cand.numel() == 0:
            thresholds.append(None)
            continue
        c = c_all[cand]
        top = c.topk(min(quota, cand.numel())).indices
        thresholds.append(float(c[top].min()))
        eligible[cand[top]] = False
    return thresholds


def _evaluate(thresholds: list[float | None], outputs: Sequence[Tensor], labels: Tensor,
              exit_costs: Sequence[float]) -> tuple[list[float], float, float]:
    """(realized exit fractions, mean FLOPs per sample, accuracy) of MaxSoftmax(thresholds)."""
    res = apply(MaxSoftmax(thresholds), outputs, exit_costs=exit_costs)
    acc = float((res.outputs.argmax(dim=1).cpu() == labels.cpu()).float().mean())
    return [c / res.batch_size for c in res.counts], float(res.mean_flops), acc


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
    if exit_costs is None:
        exit_costs = _default_exit_costs(net, example)
    exit_costs = [float(c) for c in exit_costs]
    if len(exit_costs) != n_exits + 1:
        raise ValueError(f"calibrate_budget: {len(exit_costs)} exit costs for {n_exits + 1} outputs")
    conf = _confidences(outputs)
    candidates = []
    for p in range(1, iterations + 1):
        ratio = p / base
        q = torch.tensor([ratio ** k for k in range(1, n_exits + 2)], dtype=torch.float64)
        q = (q / q.sum()).tolist()
        thresholds = _thresholds_for(conf, q)
        frac, flops, acc = _evaluate(thresholds, outputs, labels, exit_costs)
        candidates.append(BudgetCandidate(ratio, q, thresholds, frac, flops, acc))
    fitting = [c for c in candidates if c.expected_flops <= budget_flops]
    best = max(fitting, key=lambda c: (c.accuracy, -c.expected_flops)) if fitting else None
    return BudgetCalibration(candidates, best, budget_flops, exit_costs)


@dataclass
class FractionCalibration:
    """MaxSoftmax thresholds that send given fractions of the samples out at each exit."""

    target_fractions: list[float]  # per exit, last: the final output (sums to 1)
    thresholds: list[float | None]
    exit_fractions: list[float]    # realized on the calibration data (ties can add a few samples)
    expected_flops: float          # mean FLOPs per sample on the calibration data
    accuracy: float
    exit_costs: list[float]

    def policy(self) -> MaxSoftmax:
        return MaxSoftmax(self.thresholds)


def calibrate_fractions(net: Any, loader: Any, fractions: Sequence[float],
                        exit_costs: Sequence[float] | None = None) -> FractionCalibration:
    """Thresholds so that the given fractions of the samples leave at each exit.

    ``fractions``: one per early exit (the rest goes to the final output; their sum must be <= 1), or
    one per output including the final one (sum 1). On the labelled ``loader`` (``(x, y)`` batches),
    going through the exits in order, the ``fraction * m`` most confident (max-softmax) samples still
    running leave at each exit; each threshold is the lowest confidence among them, so
    ``MaxSoftmax(thresholds)`` reproduces the fractions on this data (ties can add a few samples).
    Returns the thresholds with the realized fractions, accuracy and mean FLOPs per sample
    (``exit_costs`` default to :func:`slvit_fast.accounting.summary` at the loader's input size).
    """
    outputs, labels, example = collect_outputs(net, loader, "calibrate_fractions")
    n_exits = len(outputs) - 1
    q = [float(f) for f in fractions]
    if len(q) not in (n_exits, n_exits + 1):
        raise ValueError(f"calibrate_fractions: {len(q)} fractions for {n_exits} early exits "
                         f"(give one per early exit, or one per output including the final one)")
    if any(not (0.0 <= f <= 1.0) for f in q):
        raise ValueError(f"calibrate_fractions: fractions must be in [0, 1], got {q}")
    total = sum(q[:n_exits])
    if total > 1 + 1e-9 or (len(q) == n_exits + 1 and abs(sum(q) - 1) > 1e-6):
        raise ValueError(f"calibrate_fractions: the fractions must sum to 1 at most (to 1 with the final "
                         f"output's), got {q} (sum {sum(q)})")
    q = q[:n_exits] + [max(0.0, 1.0 - total)]
    costs = [float(c) for c in (exit_costs if exit_costs is not None else _default_exit_costs(net, example))]
    if len(costs) != n_exits + 1:
        raise ValueError(f"calibrate_fractions: {len(costs)} exit costs for {n_exits + 1} outputs")
    thresholds = _thresholds_for(_confidences(outputs), q)
    frac, flops, acc = _evaluate(thresholds, outputs, labels, costs)
    return FractionCalibration(q, thresholds, frac, flops, acc, costs)
