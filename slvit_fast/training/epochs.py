"""One function per kind of epoch: classifier-wise training, end-to-end training, validation.

Each returns per-exit sums and a sample count already summed over ranks; the caller turns them into
means. Distillation is not a mode of its own: it changes each exit's loss (``losses.exit_loss``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import distributed as D
from .feature_cache import as_inputs
from .losses import Distillation, exit_loss, metric_sum, task_loss
from .sources import BatchSource, live_batches, to_device
from .state import TrainingState


class ExitLosses(nn.Module):
    """All exits' losses from precomputed branch features: the module DDP wraps (backbone stays outside)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.exits = net.exits  # registered so DDP sees exactly the exit parameters

    def forward(self, features: list[Any], target: Tensor, final: Tensor, active: list[bool], tasks: list[str],
                kd: Distillation | None) -> list[Tensor | None]:
        return [exit_loss(self.net.exit_forward(i, feature), target, final, tasks[i], kd) if active[i] else None
                for i, feature in enumerate(features)]


def _means(sums: list[float], count: int, device: torch.device, active: list[bool] | None = None) -> list[float]:
    """Per-exit means over all ranks; NaN for exits that did not train (stopped early), not a fake 0."""
    totals = D.all_reduce_sums([*sums, float(count)], device)
    means = [s / max(totals[-1], 1) for s in totals[:-1]]
    return [m if active is None or active[i] else math.nan for i, m in enumerate(means)]


def classifier_wise_epoch(losses_module: nn.Module, state: TrainingState, source: BatchSource, epoch: int,
                          tasks: list[str], kd: Distillation | None, device: torch.device, bar) -> list[float]:
    """Frozen backbone (or cache): every active exit takes one step of its own optimizer per batch."""
    K = state.num_exits
    active = state.active()
    sums, count = [0.0] * K, 0
    for features, y, final in source.batches(epoch):
        features = [to_device(f, device) for f in features]
        y, final = y.to(device), final.to(device)
        losses = losses_module(features, y, final, active, tasks, kd)
        total = sum(l for l in losses if l is not None)
        for o in state.optimizers:
            o.zero_grad(set_to_none=True)
        total.backward()
        for i, o in enumerate(state.optimizers):
            if active[i]:
                o.step()
        n = y.shape[0]
        count += n
        for i, l in enumerate(losses):
            if l is not None:
                sums[i] += l.item() * n
        bar.update(1)
    return _means(sums, count, device, active)


def end_to_end_epoch(net: nn.Module, state: TrainingState, loader, tasks: list[str], final_task: str,
                     weights: Sequence[float], kd: Distillation | None, device: torch.device, bar) -> list[float]:
    """Backbone and exits together: one optimizer on the weighted sum of every exit's and the final loss."""
    K = state.num_exits
    sums, count = [0.0] * K, 0
    opt = state.optimizers[0]
    for x, y in loader:
        inputs = tuple(t.to(device) for t in as_inputs(x))
        y = y.to(device)
        outs = net(*inputs)
        final = outs[-1]
        losses = [exit_loss(outs[i], y, final, tasks[i], kd) for i in range(K)]
        losses.append(task_loss(final, y, final_task))
        total = sum(w * l for w, l in zip(weights, losses))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        n = y.shape[0]
        count += n
        for i in range(K):
            sums[i] += losses[i].item() * n
        bar.update(1)
    return _means(sums, count, device)


@torch.no_grad()
def validation_epoch(net: nn.Module, batches: Iterable, tasks: list[str], device: torch.device
                     ) -> tuple[list[float], list[float]]:
    """Per-exit mean (loss, metric) over ``batches`` of (features, target, final), summed over ranks."""
    K = len(tasks)
    was_training = net.training
    net.eval()
    loss_sums, metric_sums, n = [0.0] * K, [0.0] * K, 0
    for features, y, _final in batches:
        y = y.to(device)
        for i, feature in enumerate(features):
            out = net.exit_forward(i, to_device(feature, device))
            loss_sums[i] += task_loss(out, y, tasks[i]).item() * y.shape[0]
            metric_sums[i] += metric_sum(out, y, tasks[i])
        n += y.shape[0]
    net.train(was_training)
    totals = D.all_reduce_sums([*loss_sums, *metric_sums, float(n)], device)
    n = max(totals[-1], 1)
    return [s / n for s in totals[:K]], [s / n for s in totals[K:2 * K]]


def evaluate_live(net: nn.Module, loader, tasks: list[str], device: torch.device) -> tuple[list[float], list[float]]:
    return validation_epoch(net, live_batches(net, loader, device), tasks, device)
