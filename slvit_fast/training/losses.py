"""Per-exit losses and metrics: cross-entropy / accuracy for classifiers, L1 / MAE for regressors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation from the final output: ``(1-alpha) * task + alpha * T^2 * KL``."""

    temperature: float = 3.0
    alpha: float = 0.5

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def task_of(num_outputs: int) -> str:
    """A one-output exit is a regressor (the paper's crowd counting), otherwise a classifier."""
    return "regression" if num_outputs == 1 else "classification"


def task_loss(output: Tensor, target: Tensor, task: str) -> Tensor:
    if task == "classification":
        return F.cross_entropy(output.float(), target.long())
    return F.l1_loss(output.float().reshape(target.shape[0], -1), target.float().reshape(target.shape[0], -1))


def distill_loss(output: Tensor, teacher: Tensor, kd: Distillation) -> Tensor:
    T = kd.temperature
    return F.kl_div(F.log_softmax(output.float() / T, -1), F.softmax(teacher.float().detach() / T, -1),
                    reduction="batchmean") * (T * T)


def exit_loss(output: Tensor, target: Tensor, final: Tensor, task: str, kd: Distillation | None) -> Tensor:
    """One exit's training loss: the task loss, mixed with distillation from ``final`` when ``kd`` is set."""
    loss = task_loss(output, target, task)
    if kd is not None and task == "classification":
        loss = (1 - kd.alpha) * loss + kd.alpha * distill_loss(output, final, kd)
    return loss


def metric_sum(output: Tensor, target: Tensor, task: str) -> float:
    """Sum over the batch of correct predictions (classification) or absolute errors (regression)."""
    with torch.no_grad():
        if task == "classification":
            return (output.argmax(-1) == target).sum().item()
        return (output.float().reshape(target.shape[0], -1) - target.float().reshape(target.shape[0], -1)).abs().sum().item()
