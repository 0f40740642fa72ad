"""The record of a training run: one entry per epoch with every exit's losses, metric, lr and status."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

CSV_COLUMNS = ("epoch", "exit", "train_loss", "val_loss", "val_metric", "metric", "lr", "stopped", "seconds")


def _plain(x: Any) -> Any:
    """Strict JSON: NaN/inf (no validation set, no best loss yet) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@dataclass
class History:
    """Per-epoch records: ``epochs[k]["exits"][i]`` has train_loss, val_loss, val_metric, lr, stopped."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)
    cache_seconds: float = 0.0  # time spent building the feature cache (0 when reused or not used)

    def exit_series(self, i: int, key: str) -> list[float]:
        return [e["exits"][i][key] for e in self.epochs]

    def to_json(self) -> str:
        return json.dumps(_plain({"metric_names": self.metric_names, "cache_seconds": self.cache_seconds,
                                  "epochs": self.epochs}), indent=1, allow_nan=False)

    def to_csv(self) -> str:
        """One row per (epoch, exit); ``metric`` names what ``val_metric`` is (accuracy or mae)."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for e in self.epochs:
            for i, r in enumerate(e["exits"]):
                w.writerow([e["epoch"], i, r["train_loss"], r["val_loss"], r["val_metric"], self.metric_names[i],
                            r["lr"], int(r["stopped"]), e["seconds"]])
        return out.getvalue()
