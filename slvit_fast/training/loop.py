"""``train_exits``: the paper's classifier-wise exit training, plus end-to-end and distillation options.

Classifier-wise (default, paper §IV-C): the backbone is frozen and runs once per batch; every exit
gets its own loss, its own Adam optimizer (lr 1e-4), its own ReduceLROnPlateau (x0.6, patience 2) and
its own early stopping (patience 5) on its validation loss; the best weights of each exit are restored
at the end. Cross-entropy for classifiers, L1 (MAE) for one-output regressors.

Nothing is lost on failure: with ``checkpoint_dir`` every completed epoch writes the exits and the
full training state atomically, and a new call with the same directory resumes after the last
completed epoch. Under ``torchrun`` (process group initialised) the exits train with
DistributedDataParallel, each rank on its shard of the data, and only rank 0 writes.

This module only orchestrates: the carried state is :class:`~.state.TrainingState`, the epochs are in
:mod:`.epochs`, the batches come from :mod:`.sources`, checkpoints from :mod:`.checkpointing`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import distributed as D
from .callbacks import Callbacks
from .checkpointing import CheckpointDir, rng_state, set_rng_state
from .epochs import ExitLosses, classifier_wise_epoch, end_to_end_epoch, evaluate_live, validation_epoch
from .cache_store import CACHE_POLICIES, open_cache
from .feature_cache import FeatureCache
from .fingerprint import tensors_hash
from .history import History
from .losses import Distillation, task_of
from .output import epoch_summary, progress_bar, report
from .sources import BatchSource
from .state import MODES, TrainingState

log = logging.getLogger("slvit_fast.training")

__all__ = ["train_exits", "evaluate_exits", "History"]


def _num_outputs(module: nn.Module) -> int:
    cfg = getattr(module, "config", None)
    if cfg is None or not hasattr(cfg, "num_outputs"):
        raise ValueError(f"cannot tell the task of exit {type(module).__name__}: pass tasks=[...]")
    return cfg.num_outputs


def _tasks(net: nn.Module, tasks: Sequence[str] | None) -> list[str]:
    K = net.num_exits
    tasks = list(tasks) if tasks is not None else [task_of(_num_outputs(m)) for m in net.exits.values()]
    if len(tasks) != K or any(t not in ("classification", "regression") for t in tasks):
        raise ValueError(f"tasks must list 'classification'/'regression' for each of the {K} exits, got {tasks}")
    return tasks


def _loss_weights(net: nn.Module, mode: str, loss_weights: Sequence[float] | None, cache_dir) -> list[float] | None:
    """Check the mode-specific arguments; the end-to-end loss weights (exits + final) or None."""
    K = net.num_exits
    if mode not in MODES:
        raise ValueError(f"mode must be 'classifier-wise' or 'end-to-end', got {mode!r}")
    if mode == "classifier-wise":
        if loss_weights is not None:
            raise ValueError("loss_weights apply to end-to-end training; classifier-wise exits train independently")
        return None
    if getattr(net, "freeze_backbone", False):
        raise ValueError("end-to-end training needs MultiExitNetwork(..., freeze_backbone=False)")
    if cache_dir is not None:
        raise ValueError("cache_dir needs a frozen backbone (classifier-wise mode)")
    if D.is_distributed():
        raise NotImplementedError("distributed training is implemented for classifier-wise mode only")
    weights = list(loss_weights) if loss_weights is not None else [1.0] * (K + 1)
    if len(weights) != K + 1 or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"loss_weights needs {K + 1} finite non-negative values (exits + final), got {weights}")
    return weights


def _open_caches(net: nn.Module, loaders: dict, cache_dir, policy: str, cache_key: str | None, progress: bool,
                 history: History, backbone_hash: str) -> dict[str, FeatureCache]:
    caches: dict[str, FeatureCache] = {}
    for split, loader in loaders.items():
        if loader is None:
            continue
        caches[split], seconds = open_cache(net, loader, Path(cache_dir) / split, policy=policy, cache_key=cache_key,
                                            progress=progress, desc=f"caching {split} features",
                                            backbone_hash=backbone_hash)
        history.cache_seconds += seconds
    return caches


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
    cache_policy: str = "auto",
    cache_key: str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    restore_best: bool = True,
    progress: bool = True,
    seed: int = 0,
    stop_after_epoch: int | None = None,
    on_epoch_end: Callable[[int, History], None] | None = None,
    callbacks: Sequence[Any] | None = None,
) -> History:
    """Train the exits of a :class:`slvit_fast.MultiExitNetwork`; returns the :class:`History`.

    Args:
        train_loader / val_loader: iterables of ``(x, y)``; ``x`` a tensor or a tuple of backbone inputs.
        mode: ``"classifier-wise"`` (frozen backbone, the paper's method) or ``"end-to-end"``
            (backbone and exits together, one Adam over all trainable parameters, the loss a weighted
            sum over exits and the final output with ``loss_weights``; needs ``freeze_backbone=False``).
        distillation: :class:`Distillation` - exits also learn the final output's softened softmax.
        cache_dir: classifier-wise only: branch features of both loaders are computed once into this
            folder (memory-mapped) and every epoch reads them instead of running the backbone. A cache
            is used only if its fingerprint matches: backbone parameters and buffers, exit paths and
            input shapes, dtypes, and the data (sample count + hash of the first and last batch).
        cache_policy: ``"auto"`` (build a new cache when none matches; the log says which field
            changed), ``"strict"`` (raise ``FeatureCacheMismatchError`` instead) or ``"rebuild"``.
        cache_key: a name for the data to use instead of hashing it (e.g. randomly augmented data).
        checkpoint_dir: exits + training state after every epoch (atomic); resumes from it.
        stop_after_epoch: stop (as if interrupted) after this epoch index - for resumable scheduling.
        progress: a tqdm bar per epoch when stderr is a terminal. Either way one summary line per
            epoch goes to the ``slvit_fast.training`` logger (INFO); with ``progress`` and no logging
            configured it is also printed.
        callbacks: objects or dicts with ``on_epoch_end(epoch, history)`` and/or
            ``on_exit_stopped(exit_index, epoch)`` (see :mod:`slvit_fast.training.callbacks`);
            ``on_epoch_end=fn`` is the same as ``callbacks=[{"on_epoch_end": fn}]``.

    With ``checkpoint_dir``, ``history.json`` and ``history.csv`` there are rewritten (atomically)
    after every epoch.
    """
    weights = _loss_weights(net, mode, loss_weights, cache_dir)
    if cache_policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {cache_policy!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    tasks = _tasks(net, tasks)
    hooks = Callbacks(callbacks, on_epoch_end)
    device = next(net.exits.parameters()).device
    torch.manual_seed(seed)
    is_main = D.rank() == 0
    history = History(metric_names=["accuracy" if t == "classification" else "mae" for t in tasks])
    state = TrainingState(net, mode, lr, lr_factor, lr_patience)

    # the backbone as the run starts (frozen: as it stays): keys the feature cache, and the checkpoint
    # refuses to resume onto another one. Hashed once for both (0.5 s on resnet152).
    backbone_hash = tensors_hash(net.backbone) if cache_dir is not None or checkpoint_dir is not None else None
    ckpt = CheckpointDir(checkpoint_dir, backbone_hash) if checkpoint_dir is not None else None
    rng = None
    if ckpt is not None and is_main:
        for p in ckpt.clean_stale():
            log.info("removed %s, left by an interrupted checkpoint write", p)
    if ckpt is not None and resume and ckpt.has_state():
        rng = ckpt.load(net, state, history)
        if is_main:
            ckpt.refresh_exports(net, history, state.epoch)
            log.info("resuming from %s after epoch %d", ckpt.directory, state.epoch)

    caches = _open_caches(net, {"train": train_loader, "val": val_loader}, cache_dir, cache_policy, cache_key,
                          progress and is_main, history, backbone_hash) if cache_dir is not None else {}
    cache_bs = cache_batch_size or getattr(train_loader, "batch_size", None) or 64
    train_source = BatchSource(net, train_loader, device, caches.get("train"), cache_bs, shuffle_cache, seed)
    val_source = BatchSource(net, val_loader, device, caches.get("val"), cache_bs, False, seed)

    loaders = {"train": train_loader, "val": val_loader}
    set_rng_state(rng, loaders)  # after the caches: a build must not shift the resumed run's random numbers
    losses_module: nn.Module = ExitLosses(net)
    if D.is_distributed() and mode == "classifier-wise":
        from torch.nn.parallel import DistributedDataParallel as DDP

        losses_module = DDP(losses_module, find_unused_parameters=True)

    for epoch in range(state.start_epoch, epochs):
        if all(state.stopped):
            break
        t0 = time.perf_counter()
        net.train()
        bar = progress_bar(train_source.num_batches(), f"epoch {epoch + 1}/{epochs}", progress and is_main)
        if mode == "classifier-wise":
            train_loss = classifier_wise_epoch(losses_module, state, train_source, epoch, tasks, distillation,
                                               device, bar)
        else:
            train_loss = end_to_end_epoch(net, state, train_loader, tasks, tasks[-1], weights, distillation,
                                          device, bar)
        bar.close()

        val_loss, val_metric = train_loss, [math.nan] * net.num_exits
        if val_loader is not None:
            val_loss, val_metric = validation_epoch(net, val_source.batches(epoch), tasks, device)
        status, newly_stopped = state.end_epoch(epoch, val_loss, early_stopping_patience)
        records = [{"train_loss": train_loss[i], "val_loss": val_loss[i], "val_metric": val_metric[i], **status[i]}
                   for i in range(net.num_exits)]
        history.epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "exits": records})
        if is_main:
            report(epoch_summary(history, epochs, val_loader is not None), progress)
            for i in newly_stopped:
                log.info("exit%d (%s) stopped early after epoch %d: best %s loss %.4f", i, net.exit_paths[i],
                         epoch + 1, "validation" if val_loader is not None else "training", state.best_loss[i])

        if ckpt is not None and is_main:
            ckpt.save(net, state, history, rng_state(loaders))
        for i in newly_stopped:
            hooks.exit_stopped(i, epoch)
        hooks.epoch_end(epoch, history)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            return history

    if restore_best and val_loader is not None:
        state.restore_best()
    if ckpt is not None and is_main:
        ckpt.save_best(net, state.epoch)
    return history


def evaluate_exits(net: nn.Module, loader, tasks: Sequence[str] | None = None) -> tuple[list[float], list[float]]:
    """Per-exit (loss, metric) on ``loader``: accuracy for classifiers, MAE for regressors."""
    return evaluate_live(net, loader, _tasks(net, tasks), next(net.exits.parameters()).device)
