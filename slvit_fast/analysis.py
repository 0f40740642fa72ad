"""Analysis of a multi-exit network on labelled data (seeds/004 §3.2-3.3).

All functions take ``outputs``: the list returned by ``net(x)`` (early exits, then the final output),
concatenated over a data set - :func:`collect` builds it from a loader - and ``labels`` (N,).

* :func:`per_exit_accuracy` - top-1 accuracy of every exit and of the final output (the anytime
  prediction curve); :func:`per_exit_error` - mean absolute error for regression exits.
* :func:`overthinking` - samples some exit gets right but the final output gets wrong (seeds/004
  eq. 3.11 with k = the final output), overall and per exit.
* :func:`upper_bounds` - the *oracle* exits every sample at the earliest exit that classifies it
  correctly and spends nothing on a sample no exit gets right; the *realistic* upper bound sends such
  samples to the final output (so it pays the full cost). Both reach the accuracy "some exit is right".
* :func:`accuracy_flops_curve` - accuracy and mean FLOPs per sample of a policy over a sweep of
  thresholds (the budgeted-batch curve), using the brute-force :func:`slvit_fast.policies.apply`.
* :func:`plot_accuracy_flops` - those curves, one per exit type or policy, as a PNG (the paper-style
  accuracy vs FLOPs figure).

Costs (``exit_costs``): FLOPs per sample for leaving at each exit and at the final output, e.g.
``[r.cost_flops for r in accounting.summary(net).rows]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import policies as _policies
from .calibration import collect_outputs

__all__ = [
    "collect", "per_exit_accuracy", "per_exit_error", "overthinking", "Overthinking", "upper_bounds",
    "UpperBounds", "accuracy_flops_curve", "CurvePoint", "exit_costs", "plot_accuracy_flops",
]


def collect(net: Any, loader: Iterable) -> tuple[list[Tensor], Tensor]:
    """Run ``net(x)`` over ``(x, y)`` batches: (outputs of every exit and the final output, labels)."""
    outputs, labels, _ = collect_outputs(net, loader, "analysis.collect")
    return outputs, labels


def exit_costs(net: Any, input_size: Any = None) -> list[float]:
    """FLOPs per sample of leaving at each exit (then the final output), as ``early_exit`` spends them."""
    from .accounting import summary

    return [float(r.cost_flops) for r in summary(net, input_size).rows]


def _correct(outputs: Sequence[Tensor], labels: Tensor) -> Tensor:
    """(num_outputs, N) bool: is output j right on sample n."""
    labels = torch.as_tensor(labels)
    return torch.stack([o.argmax(dim=1).cpu() == labels.cpu() for o in outputs])


def per_exit_accuracy(outputs: Sequence[Tensor], labels: Tensor) -> list[float]:
    return _correct(outputs, labels).float().mean(dim=1).tolist()


def per_exit_error(outputs: Sequence[Tensor], targets: Tensor) -> list[float]:
    """Mean absolute error of every (regression) output, e.g. the crowd count's MAE."""
    t = torch.as_tensor(targets).reshape(-1).float()
    return [float((o.reshape(o.shape[0], -1)[:, 0].float().cpu() - t.cpu()).abs().mean()) for o in outputs]


@dataclass
class Overthinking:
    rate: float             # fraction of samples some early exit gets right and the final output wrong
    per_exit: list[float]   # fraction right at exit i and wrong at the final output
    count: int


def overthinking(outputs: Sequence[Tensor], labels: Tensor) -> Overthinking:
    c = _correct(outputs, labels)
    early, final = c[:-1], c[-1]
    over = early & ~final
    n = c.shape[1]
    any_over = over.any(dim=0)
    return Overthinking(float(any_over.float().mean()), over.float().mean(dim=1).tolist(), int(any_over.sum()))


@dataclass
class UpperBounds:
    accuracy: float          # fraction of samples at least one output classifies correctly (both bounds)
    oracle_flops: float      # mean FLOPs per sample, nothing spent on hopeless samples
    realistic_flops: float   # mean FLOPs per sample, hopeless samples run to the final output
    oracle_exit_fractions: list[float]  # where the oracle sends samples (last: final output)
    hopeless: float          # fraction no output gets right


def upper_bounds(outputs: Sequence[Tensor], labels: Tensor, exit_costs: Sequence[float]) -> UpperBounds:
    c = _correct(outputs, labels)
    k, n = c.shape
    if len(exit_costs) != k:
        raise ValueError(f"upper_bounds: {len(exit_costs)} costs for {k} outputs")
    cost = torch.tensor([float(x) for x in exit_costs], dtype=torch.float64)
    any_ok = c.any(dim=0)
    first = torch.where(any_ok, c.float().argmax(dim=0), torch.full((n,), k - 1))
    oracle = torch.where(any_ok, cost[first], torch.zeros(n, dtype=torch.float64))
    realistic = cost[first]
    frac = torch.bincount(first[any_ok], minlength=k).double() / n
    return UpperBounds(float(any_ok.float().mean()), float(oracle.mean()), float(realistic.mean()),
                       frac.tolist(), float((~any_ok).float().mean()))


@dataclass
class CurvePoint:
    threshold: Any
    accuracy: float
    flops: float                # mean FLOPs per sample
    exit_fractions: list[float]


def accuracy_flops_curve(
    outputs: Sequence[Tensor],
    labels: Tensor,
    exit_costs: Sequence[float],
    policy: Callable[[Any], "_policies.Policy"] = _policies.MaxSoftmax,
    thresholds: Iterable[Any] | None = None,
) -> list[CurvePoint]:
    """Accuracy vs mean FLOPs of ``policy(threshold)`` for each threshold (default: MaxSoftmax over
    0, 0.05, ..., 1 - every sample at exit 0 to almost none early)."""
    if thresholds is None:
        thresholds = [i / 20 for i in range(21)]
    labels = torch.as_tensor(labels)
    cost = torch.tensor([float(x) for x in exit_costs], dtype=torch.float64)
    if cost.numel() != len(outputs):
        raise ValueError(f"accuracy_flops_curve: {cost.numel()} costs for {len(outputs)} outputs")
    points = []
    for t in thresholds:
        r = _policies.apply(policy(t), outputs, exit_costs=cost.tolist())
        acc = float((r.outputs.argmax(dim=1).cpu() == labels.cpu()).float().mean())
        n = r.batch_size
        points.append(CurvePoint(t, acc, r.mean_flops, [c / n for c in r.counts]))
    return points


def _xy(points: Sequence[Any]) -> tuple[list[float], list[float]]:
    """(FLOPs, accuracy) of CurvePoints or (flops, accuracy) pairs, sorted by FLOPs."""
    pairs = sorted((float(p.flops), float(p.accuracy)) if isinstance(p, CurvePoint) else (float(p[0]), float(p[1]))
                   for p in points)
    return [f for f, _ in pairs], [a for _, a in pairs]


def _flops_unit(largest: float) -> tuple[str, float]:
    for unit, div in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("KFLOPs", 1e3)):
        if largest >= div:
            return unit, div
    return "FLOPs", 1.0


def plot_accuracy_flops(
    curves: Mapping[str, Sequence[Any]],
    path: str | os.PathLike,
    *,
    backbone: tuple[float, float] | None = None,
    exits: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy vs mean FLOPs per sample, one curve per exit type or policy, written as a PNG.

    Args:
        curves: ``{label: points}``; points as :func:`accuracy_flops_curve` returns them, or
            ``(mean FLOPs per sample, accuracy)`` pairs - e.g. ``{"SL-ViT exits": curve_a,
            "CNN exits": curve_b}``.
        path: the PNG to write (folders are created).
        backbone: ``(FLOPs, accuracy)`` of the plain backbone, drawn as a star.
        exits: ``{label: [(cumulative FLOPs, accuracy) of each exit alone, ...]}``, drawn as markers in
            the colour of the curve with the same label.
        title: figure title.

    Uses matplotlib's Agg renderer directly (no display, no pyplot state); returns the path written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # an optional dependency (extra [data])
        raise ImportError("plot_accuracy_flops needs matplotlib: pip install matplotlib") from e
    if not curves:
        raise ValueError("plot_accuracy_flops: give at least one curve")
    xy = {label: _xy(points) for label, points in curves.items()}
    empty = [label for label, (x, _) in xy.items() if not x]
    if empty:
        raise ValueError(f"plot_accuracy_flops: curve(s) {empty} have no points")
    largest = max([max(x) for x, _ in xy.values()] + ([backbone[0]] if backbone else []))
    unit, div = _flops_unit(largest)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.subplots()
    colours = {}
    for label, (x, y) in xy.items():
        (line,) = ax.plot([v / div for v in x], [100 * a for a in y], marker=".", label=label)
        colours[label] = line.get_color()
    for label, points in (exits or {}).items():
        x, y = _xy(points)
        ax.scatter([v / div for v in x], [100 * a for a in y], marker="o", s=40, zorder=3,
                   color=colours.get(label), edgecolors="black", label=f"{label}: each exit alone")
    if backbone is not None:
        ax.scatter([backbone[0] / div], [100 * backbone[1]], marker="*", s=160, color="black", zorder=4,
                   label="backbone")
    ax.set_xlabel(f"mean {unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
