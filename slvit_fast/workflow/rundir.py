"""The run directory ``slvit-fast train --out DIR`` writes and ``slvit-fast evaluate --run DIR`` reads.

=======================  ==========================================================================
``run.json``             how to rebuild the network and the data splits: backbone, weights source,
                         input size, exit type and paths, classes, normalisation, split seed/fractions
``backbone.safetensors`` the backbone's weights, when they are not simply a file or torchvision name
                         (fine-tuned, a replaced classifier, or random weights)
``exits.safetensors``    the trained exits (``MultiExitNetwork.save_exits``; configs in its metadata)
``policy.json``          the calibrated exit policy (``{"type": "MaxSoftmax", "thresholds": [...]}``)
``report.json``          test-split results: per exit params/FLOPs/accuracy, early-exit accuracy, mean
                         FLOPs, FLOP speedup, measured wall-clock
``accuracy_flops.png``   accuracy vs mean FLOPs per sample, per exit and along the threshold sweep
``cache/``               the exits' feature cache (``train_exits(cache_dir=...)``)
=======================  ==========================================================================
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .. import policies
from ..checkpoint import atomic_write
from .errors import UsageError

__all__ = ["RUN_FILE", "REPORT_FILE", "POLICY_FILE", "EXITS_FILE", "BACKBONE_FILE", "PLOT_FILE",
           "write_json", "read_json", "policy_to_json", "policy_from_json", "read_run"]

RUN_FILE, REPORT_FILE, POLICY_FILE = "run.json", "report.json", "policy.json"
EXITS_FILE, BACKBONE_FILE, PLOT_FILE = "exits.safetensors", "backbone.safetensors", "accuracy_flops.png"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(_clean(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e})") from None


def policy_to_json(policy: policies.Policy) -> dict[str, Any]:
    if not isinstance(policy, policies.MaxSoftmax):
        raise TypeError(f"only MaxSoftmax policies are stored in run directories, got {policy!r}")
    t = policy.thresholds
    return {"type": "MaxSoftmax", "thresholds": list(t) if isinstance(t, (list, tuple)) else t}


def policy_from_json(data: dict[str, Any], source: str = POLICY_FILE) -> policies.Policy:
    if not isinstance(data, dict) or data.get("type") != "MaxSoftmax" or "thresholds" not in data:
        raise UsageError(f"{source}: expected {{'type': 'MaxSoftmax', 'thresholds': [...]}}, got {data!r}")
    return policies.MaxSoftmax(data["thresholds"])


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a run directory (a clear error when ``run_dir`` is not one)."""
    d = Path(run_dir)
    if not d.is_dir():
        raise UsageError(f"run directory {str(d)!r} does not exist")
    if not (d / RUN_FILE).is_file():
        raise UsageError(f"{str(d)!r} is not a run directory of 'slvit-fast train' (no {RUN_FILE})")
    for f in (EXITS_FILE, POLICY_FILE):
        if not (d / f).is_file():
            raise UsageError(f"run directory {str(d)!r} has no {f} (was the training run interrupted?)")
    return read_json(d / RUN_FILE)
