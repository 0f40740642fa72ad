"""Fine-tune a whole backbone (its classifier included) on the training split before the exits learn.

The paper assumes a trained backbone; ``slvit-fast train --train-backbone-epochs N`` provides one when
the user has only an ImageNet-pretrained (or random) backbone: Adam over every parameter with a cosine-decaying
learning rate, cross-entropy, BatchNorm in training mode, and the weights of the epoch with the best validation accuracy kept.

BatchNorm cannot train on a batch of one sample (one value per channel once the map is 1x1, and a useless
batch statistic before that), so for a backbone with BatchNorm a 1-sample batch (the last one when the
training split is one more than a multiple of the batch size) is skipped, and a loader whose every batch
has one sample (batch size 1, or one training sample) is a :class:`UsageError` before training starts.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

log = logging.getLogger("slvit_fast.workflow")

__all__ = ["finetune_backbone", "accuracy"]


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(dim=1) == y).sum())
            total += int(y.shape[0])
    return right / max(total, 1)


def _batch_sizes(loader) -> list[int] | None:
    """The sizes of the batches ``loader`` yields per epoch, if a DataLoader with a ``batch_size`` (else None)."""
    bs = getattr(loader, "batch_size", None)
    sampler = getattr(loader, "sampler", None)
    try:
        n = len(sampler)
    except TypeError:
        return None
    if not bs:
        return None
    sizes = [int(bs)] * (n // bs)
    if n % bs and not getattr(loader, "drop_last", False):
        sizes.append(n % bs)
    return sizes


def finetune_backbone(backbone: nn.Module, train_loader, val_loader, epochs: int, lr: float = 1e-3,
                      seed: int = 0) -> dict:
    """Train ``backbone`` in place for ``epochs``; keeps the best validation epoch. Returns a summary.

    With BatchNorm layers, 1-sample training batches are skipped (module docstring).
    """
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    sizes = _batch_sizes(train_loader)
    steps_per_epoch = len(train_loader)
    if has_bn and sizes is not None:
        steps_per_epoch = sum(1 for b in sizes if b >= 2)
        if sizes and steps_per_epoch == 0:
            raise UsageError(f"fine-tuning the backbone (--train-backbone-epochs) needs training batches of at least "
                             f"2 samples: its BatchNorm layers cannot train on one sample, and with batch size "
                             f"{train_loader.batch_size} and {sum(sizes)} training sample(s) every batch has one; "
                             f"use --batch-size 2 or more (and at least 2 training samples)")
    torch.manual_seed(seed)
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(backbone.parameters(), lr=lr)
    # cosine decay to zero over the run, per step: a few epochs then end at a low learning rate, which
    # settles BatchNorm statistics and weights (on digits: +1-2 points over a constant rate at 3 epochs)
    steps = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best_acc, best_state, history = -1.0, None, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        backbone.train()
        loss_sum = count = skipped = 0
        for x, y in train_loader:
            if has_bn and int(y.shape[0]) < 2:  # BatchNorm in training mode cannot use it (module docstring)
                skipped += int(y.shape[0])
                continue
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(backbone(x), y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * int(y.shape[0])
            count += int(y.shape[0])
        if skipped and epoch == 0:
            log.info("backbone fine-tuning skips %d sample(s) per epoch: they fall in a 1-sample batch, which "
                     "BatchNorm cannot train on", skipped)
        if skipped and count == 0:  # a loader without a batch_size (checked up front otherwise)
            raise UsageError("fine-tuning the backbone (--train-backbone-epochs): no training batch of at least 2 "
                             "samples (BatchNorm cannot train on one sample); use --batch-size 2 or more")
        val_acc = accuracy(backbone, val_loader)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(count, 1), "val_accuracy": val_acc,
                        "seconds": time.perf_counter() - t0})
        log.info("backbone epoch %d/%d (%.1fs): loss %.4f, val accuracy %.1f%%", epoch + 1, epochs,
                 history[-1]["seconds"], history[-1]["train_loss"], 100 * val_acc)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(backbone.state_dict())
    if best_state is not None:
        backbone.load_state_dict(best_state)
    backbone.eval()
    return {"epochs": history, "best_val_accuracy": best_acc, "lr": lr}
