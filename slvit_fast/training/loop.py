"""``train_exits``: the paper's classifier-wise exit training, plus end-to-end and distillation options.

Classifier-wise (default, paper §IV-C): the backbone is frozen and runs once per batch; every exit
gets its own loss, its own Adam optimizer (lr 1e-4), its own ReduceLROnPlateau (x0.6, patience 2) and
its own early stopping (patience 5) on its validation loss; the best weights of each exit are restored
at the end. Cross-entropy for classifiers, L1 (MAE) for one-output regressors.

Nothing is lost on failure: with ``checkpoint_dir`` every completed epoch writes the exits and the
full training state atomically, and a new call with the same directory resumes after the last
completed epoch. Under ``torchrun`` (process group initialised) the exits train with
DistributedDataParallel, each rank on its shard of the data, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as D
from ..checkpoint import load_exits, load_training_state, save_exits, save_training_state
from .feature_cache import FeatureCache, as_inputs
from .losses import Distillation, distill_loss, metric_sum, task_loss, task_of

log = logging.getLogger("slvit_fast.training")


@dataclass
class History:
    """Per-epoch records: ``epochs[k]["exits"][i]`` has train_loss, val_loss, val_metric, lr, stopped."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    cache_seconds: float = 0.0  # time spent building the feature cache (0 when reused or not used)

    def exit_series(self, i: int, key: str) -> list[float]:
        return [e["exits"][i][key] for e in self.epochs]


class _ExitLosses(nn.Module):
    """All exits' losses from precomputed branch features: the module DDP wraps (backbone stays outside)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.exits = net.exits  # registered so DDP sees exactly the exit parameters

    def forward(self, features: list[Any], target: Tensor, final: Tensor, active: list[bool], tasks: list[str],
                kd: Distillation | None) -> list[Tensor | None]:
        losses: list[Tensor | None] = []
        for i, feature in enumerate(features):
            if not active[i]:
                losses.append(None)
                continue
            out = self.net.exit_forward(i, feature)
            loss = task_loss(out, target, tasks[i])
            if kd is not None and tasks[i] == "classification":
                loss = (1 - kd.alpha) * loss + kd.alpha * distill_loss(out, final, kd)
            losses.append(loss)
        return losses


def _num_outputs(module: nn.Module) -> int:
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "num_outputs"):
        raise ValueError(f"cannot tell the task of exit {type(module).__name__}: pass tasks=[...]")
    return cfg.num_outputs


def _to(feature: Any, device: torch.device) -> Any:
    if isinstance(feature, (tuple, list)):
        return tuple(t.to(device) for t in feature)
    return feature.to(device)


def train_exits(
    net: nn.Module,
    train_loader,
    val_loader=None,
    *,
    epochs: int = 100,
    lr: float = 1e-4,
    lr_factor: float = 0.6,
    lr_patience: int = 2,
    early_stopping_patience: int | None = 5,
    tasks: Sequence[str] | None = None,
    mode: str = "classifier-wise",
    loss_weights: Sequence[float] | None = None,
    distillation: Distillation | None = None,
    cache_dir: str | Path | None = None,
    cache_batch_size: int | None = None,
    shuffle_cache: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    restore_best: bool = True,
    progress: bool = True,
    seed: int = 0,
    stop_after_epoch: int | None = None,
    on_epoch_end: Callable[[int, History], None] | None = None,
) -> History:
    """Train the exits of a :class:`slvit_fast.MultiExitNetwork`; returns the :class:`History`.

    Args:
        train_loader / val_loader: iterables of ``(x, y)``; ``x`` a tensor or a tuple of backbone inputs.
        mode: ``"classifier-wise"`` (frozen backbone, the paper's method) or ``"end-to-end"``
            (backbone and exits together, one Adam over all trainable parameters, the loss a weighted
            sum over exits and the final output with ``loss_weights``; needs ``freeze_backbone=False``).
        distillation: :class:`Distillation` - exits also learn the final output's softened softmax.
        cache_dir: classifier-wise only: branch features of both loaders are computed once into this
            folder (memory-mapped) and every epoch reads them instead of running the backbone.
        checkpoint_dir: exits + training state after every epoch (atomic); resumes from it.
        stop_after_epoch: stop (as if interrupted) after this epoch index - for resumable scheduling.
    """
    if mode not in ("classifier-wise", "end-to-end"):
        raise ValueError(f"mode must be 'classifier-wise' or 'end-to-end', got {mode!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    K = net.num_exits
    tasks = list(tasks) if tasks is not None else [task_of(_num_outputs(m)) for m in net.exits.values()]
    if len(tasks) != K or any(t not in ("classification", "regression") for t in tasks):
        raise ValueError(f"tasks must list 'classification'/'regression' for each of the {K} exits, got {tasks}")
    final_task = tasks[-1]
    if mode == "end-to-end":
        if getattr(net, "freeze_backbone", False):
            raise ValueError("end-to-end training needs MultiExitNetwork(..., freeze_backbone=False)")
        if cache_dir is not None:
            raise ValueError("cache_dir needs a frozen backbone (classifier-wise mode)")
        if D.is_distributed():
            raise NotImplementedError("distributed training is implemented for classifier-wise mode only")
        weights = list(loss_weights) if loss_weights is not None else [1.0] * (K + 1)
        if len(weights) != K + 1 or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"loss_weights needs {K + 1} finite non-negative values (exits + final), got {weights}")
    elif loss_weights is not None:
        raise ValueError("loss_weights apply to end-to-end training; classifier-wise exits train independently")

    device = next(net.exits.parameters()).device
    torch.manual_seed(seed)
    is_main = D.rank() == 0
    history = History(metric_names=["accuracy" if t == "classification" else "mae" for t in tasks])

    # -- optimisation state: one optimizer + scheduler per exit (classifier-wise) or one overall ----
    if mode == "classifier-wise":
        groups = [list(m.parameters()) for m in net.exits.values()]
    else:
        groups = [[p for p in net.parameters() if p.requires_grad]]
    optimizers = [torch.optim.Adam(g, lr=lr) for g in groups]
    schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=lr_factor, patience=lr_patience) for o in optimizers]
    best_loss = [math.inf] * K
    bad_epochs = [0] * K
    stopped = [False] * K
    best_state: list[dict[str, Tensor] | None] = [None] * K
    start_epoch = 0

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state_path = ckpt / "training_state.pt" if ckpt else None
    if ckpt and resume and state_path.exists():
        state = load_training_state(state_path)
        if state["num_exits"] != K or state["mode"] != mode:
            raise ValueError(f"{state_path}: saved for {state['num_exits']} exits in {state['mode']!r} mode, "
                             f"not {K} exits in {mode!r} mode")
        load_exits(net, ckpt / "last.safetensors")
        if mode == "end-to-end":
            net.backbone.load_state_dict(state["backbone"])
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for s, ss in zip(schedulers, state["schedulers"]):
            s.load_state_dict(ss)
        best_loss, bad_epochs, stopped = list(state["best_loss"]), list(state["bad_epochs"]), list(state["stopped"])
        best_state = [b if b else None for b in state["best_state"]]
        history.epochs = state["history"]
        start_epoch = state["epoch"] + 1
        if is_main:
            log.info("resuming from %s after epoch %d", ckpt, state["epoch"])

    # -- data: live backbone or a feature cache -----------------------------------------------------
    caches: dict[str, FeatureCache] = {}
    if cache_dir is not None:
        if mode != "classifier-wise":
            raise ValueError("cache_dir needs classifier-wise mode")
        for split, loader in (("train", train_loader), ("val", val_loader)):
            if loader is None:
                continue
            folder = Path(cache_dir) / split
            if FeatureCache.exists(folder):
                caches[split] = FeatureCache(folder)
            else:
                if D.is_distributed():
                    raise NotImplementedError("build the feature cache before launching distributed training")
                t_cache = time.perf_counter()
                caches[split] = FeatureCache.build(net, loader, folder, progress and is_main, f"caching {split} features")
                history.cache_seconds += time.perf_counter() - t_cache
    cache_bs = cache_batch_size or getattr(train_loader, "batch_size", None) or 64

    loss_module = _ExitLosses(net)
    ddp_module: nn.Module = loss_module
    if D.is_distributed() and mode == "classifier-wise":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_module = DDP(loss_module, find_unused_parameters=True)

    def batches(split: str, loader, epoch: int):
        """(features, target, final) per batch; features from the cache or a live frozen backbone."""
        if split in caches:
            yield from caches[split].batches(cache_bs, shuffle_cache and split == "train", seed + epoch,
                                             shard=(D.rank(), D.world_size()))
            return
        for x, y in loader:
            inputs = tuple(t.to(device) for t in as_inputs(x))
            *features, final = net.branch_features(*inputs)
            yield features, y, final

    def n_batches(split: str, loader) -> int | None:
        if split in caches:
            return caches[split].num_batches(cache_bs, D.world_size())
        try:
            return len(loader)
        except TypeError:
            return None

    for epoch in range(start_epoch, epochs):
        if all(stopped):
            break
        t0 = time.perf_counter()
        net.train()
        active = [not s for s in stopped]
        sums = [0.0] * K
        counts = 0
        bar = tqdm(total=n_batches("train", train_loader), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not (progress and is_main), leave=False)
        if mode == "classifier-wise":
            for features, y, final in batches("train", train_loader, epoch):
                features = [_to(f, device) for f in features]
                y, final = y.to(device), final.to(device)
                losses = ddp_module(features, y, final, active, tasks, distillation)
                total = sum(l for l in losses if l is not None)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                total.backward()
                for i, o in enumerate(optimizers):
                    if active[i]:
                        o.step()
                n = y.shape[0]
                counts += n
                for i, l in enumerate(losses):
                    if l is not None:
                        sums[i] += l.item() * n
                bar.update(1)
        else:
            for x, y in train_loader:
                inputs = tuple(t.to(device) for t in as_inputs(x))
                y = y.to(device)
                outs = net(*inputs)
                final = outs[-1]
                losses = []
                for i in range(K):
                    loss = task_loss(outs[i], y, tasks[i])
                    if distillation is not None and tasks[i] == "classification":
                        loss = (1 - distillation.alpha) * loss + distillation.alpha * distill_loss(outs[i], final, distillation)
                    losses.append(loss)
                losses.append(task_loss(final, y, final_task))
                total = sum(w * l for w, l in zip(weights, losses))
                optimizers[0].zero_grad(set_to_none=True)
                total.backward()
                optimizers[0].step()
                n = y.shape[0]
                counts += n
                for i in range(K):
                    sums[i] += losses[i].item() * n
                bar.update(1)
        bar.close()
        totals = D.all_reduce_sums([*sums, float(counts)], device)
        train_loss = [s / max(totals[-1], 1) for s in totals[:-1]]

        val_loss, val_metric = train_loss, [math.nan] * K
        if val_loader is not None:
            val_loss, val_metric = _evaluate(net, batches("val", val_loader, epoch), tasks, device)

        records = []
        for i in range(K):
            if mode == "classifier-wise" and not stopped[i]:
                schedulers[i].step(val_loss[i])
            if not stopped[i]:
                if val_loss[i] < best_loss[i]:
                    best_loss[i], bad_epochs[i] = val_loss[i], 0
                    module = list(net.exits.values())[i]
                    best_state[i] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                else:
                    bad_epochs[i] += 1
                    if early_stopping_patience is not None and bad_epochs[i] >= early_stopping_patience:
                        stopped[i] = mode == "classifier-wise"
            opt = optimizers[i if mode == "classifier-wise" else 0]
            records.append({"train_loss": train_loss[i], "val_loss": val_loss[i], "val_metric": val_metric[i],
                            "lr": opt.param_groups[0]["lr"], "stopped": stopped[i]})
        if mode == "end-to-end":
            schedulers[0].step(sum(val_loss))
            if early_stopping_patience is not None and min(bad_epochs) >= early_stopping_patience:
                stopped = [True] * K
        history.epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "exits": records})
        if is_main and progress:
            parts = [f"exit{i}: loss {r['train_loss']:.4f}" + (f" val {r['val_loss']:.4f} {history.metric_names[i]} "
                     f"{r['val_metric']:.4f}" if val_loader is not None else "") + (" (stopped)" if r["stopped"] else "")
                     for i, r in enumerate(records)]
            print(f"epoch {epoch + 1}/{epochs} ({history.epochs[-1]['seconds']:.1f}s): " + "; ".join(parts), flush=True)

        if ckpt is not None and is_main:
            save_exits(net, ckpt / "last.safetensors")
            state = {
                "epoch": epoch, "mode": mode, "num_exits": K,
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
                "best_loss": best_loss, "bad_epochs": bad_epochs, "stopped": stopped,
                "best_state": [b if b is not None else {} for b in best_state],
                "history": history.epochs,
            }
            if mode == "end-to-end":
                state["backbone"] = net.backbone.state_dict()
            save_training_state(state_path, state)
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return history

    if restore_best and val_loader is not None:
        for module, state in zip(net.exits.values(), best_state):
            if state:
                module.load_state_dict(state)
    if ckpt is not None and is_main:
        save_exits(net, ckpt / "best.safetensors")
    return history


@torch.no_grad()
def _evaluate(net: nn.Module, batches, tasks: list[str], device: torch.device) -> tuple[list[float], list[float]]:
    K = len(tasks)
    was_training = net.training
    net.eval()
    loss_sums, metric_sums, n = [0.0] * K, [0.0] * K, 0
    for features, y, _final in batches:
        y = y.to(device)
        for i, feature in enumerate(features):
            out = net.exit_forward(i, _to(feature, device))
            loss_sums[i] += task_loss(out, y, tasks[i]).item() * y.shape[0]
            metric_sums[i] += metric_sum(out, y, tasks[i])
        n += y.shape[0]
    net.train(was_training)
    totals = D.all_reduce_sums([*loss_sums, *metric_sums, float(n)], device)
    n = max(totals[-1], 1)
    return [s / n for s in totals[:K]], [s / n for s in totals[K:2 * K]]


def evaluate_exits(net: nn.Module, loader, tasks: Sequence[str] | None = None) -> tuple[list[float], list[float]]:
    """Per-exit (loss, metric) on ``loader``: accuracy for classifiers, MAE for regressors."""
    tasks = list(tasks) if tasks is not None else [task_of(_num_outputs(m)) for m in net.exits.values()]
    device = next(net.exits.parameters()).device

    def live():
        for x, y in loader:
            *features, final = net.branch_features(*tuple(t.to(device) for t in as_inputs(x)))
            yield features, y, final

    return _evaluate(net, live(), tasks, device)

