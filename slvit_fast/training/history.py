"""The record of a training run: one entry per epoch with every exit's losses, metric, lr and status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    """Per-epoch records: ``epochs[k]["exits"][i]`` has train_loss, val_loss, val_metric, lr, stopped."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    cache_seconds: float = 0.0  # time spent building the feature cache (0 when reused or not used)

    def exit_series(self, i: int, key: str) -> list[float]:
        return [e["exits"][i][key] for e in self.epochs]
