"""Where a split's batches come from: the live frozen backbone, or a feature cache read from disk.

Either way an epoch sees ``(per-exit features, targets, final outputs)`` batches, so the epoch
functions do not know (or care) whether the backbone ran.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from . import distributed as D
from .feature_cache import FeatureCache, FeatureCacheError, as_inputs


def to_device(feature: Any, device: torch.device) -> Any:
    if isinstance(feature, (tuple, list)):
        return tuple(t.to(device) for t in feature)
    return feature.to(device)


def live_batches(net: nn.Module, loader, device: torch.device) -> Iterator[tuple[list[Any], Any, torch.Tensor]]:
    for x, y in loader:
        inputs = tuple(t.to(device) for t in as_inputs(x))
        *features, final = net.branch_features(*inputs)
        yield features, y, final


class BatchSource:
    """One split's batches; ``cache`` (if given) replaces the backbone, sharded per rank under torchrun."""

    def __init__(self, net: nn.Module, loader, device: torch.device, cache: FeatureCache | None = None,
                 batch_size: int = 64, shuffle: bool = False, seed: int = 0):
        self.net, self.loader, self.device, self.cache = net, loader, device, cache
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        if cache is not None and cache.num_exits != net.num_exits:
            raise FeatureCacheError(f"feature cache {cache.directory} holds features for {cache.num_exits} exits, the "
                                    f"network has {net.num_exits}: use a cache built for this network")

    def batches(self, epoch: int) -> Iterator[tuple[list[Any], Any, torch.Tensor]]:
        if self.cache is not None:
            # a new (seeded) order per epoch, identical on resume and on every rank
            return self.cache.batches(self.batch_size, self.shuffle, self.seed + epoch,
                                      shard=(D.rank(), D.world_size()))
        return live_batches(self.net, self.loader, self.device)

    def num_batches(self) -> int | None:
        if self.cache is not None:
            return self.cache.num_batches(self.batch_size, D.world_size())
        try:
            return len(self.loader)
        except TypeError:
            return None
