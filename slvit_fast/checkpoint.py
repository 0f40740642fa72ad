"""Exit checkpoints that cannot run code and cannot be half-written.

* Exit weights go to a safetensors file (tensors only) with each exit's type, module path and config
  stored as JSON metadata - loading never unpickles anything.
* Training state (optimizer and scheduler state, epoch, history) goes through ``torch.save`` and is
  read back with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
* Every write goes to a temporary file in the same folder, is flushed to disk, then atomically
  renamed over the target: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .cnn_exit import CNNExit
from .config import CNNExitConfig, SLViTConfig
from .errors import CheckpointMismatchError
from .slvit_exit import SLViTExit

FORMAT = "slvit_fast.exits/1"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _describe(module: torch.nn.Module) -> dict[str, Any]:
    if isinstance(module, SLViTExit):
        return {"type": "SLViTExit", "config": module.config.to_dict()}
    if isinstance(module, CNNExit):
        return {"type": "CNNExit", "config": module.config.to_dict()}
    return {"type": type(module).__name__, "config": None}


def save_exits(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save only the exits of a MultiExitNetwork (weights + configs), atomically."""
    tensors, exits = {}, []
    for i, (key, module) in enumerate(net.exits.items()):
        exits.append({"key": key, "path": net.exit_paths[i], **_describe(module)})
        for name, value in module.state_dict().items():
            tensors[f"{key}/{name}"] = value.detach().contiguous().cpu()
    metadata = {"format": FORMAT, "exits": json.dumps(exits)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _config_diff(saved: dict | None, current: dict | None) -> list[str]:
    if saved is None or current is None:
        return [] if saved == current else ["config present in only one of checkpoint and model"]
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs model {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def read_exit_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: not a slvit_fast exits checkpoint (format {meta.get('format')!r})")
    return json.loads(meta["exits"])


def load_exits(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load exits saved by :func:`save_exits`; any config or shape mismatch is an error naming it."""
    saved = read_exit_metadata(path)
    keys = list(net.exits.keys())
    if [e["key"] for e in saved] != keys:
        raise CheckpointMismatchError(
            f"{path}: checkpoint has exits at {[e['path'] for e in saved]}, the network at {list(net.exit_paths)}"
        )
    tensors = load_file(str(path))
    for entry, (key, module) in zip(saved, net.exits.items()):
        current = _describe(module)
        if entry["type"] != current["type"]:
            raise CheckpointMismatchError(f"exit {entry['path']!r}: checkpoint holds a {entry['type']}, "
                                          f"the network a {current['type']}")
        diff = _config_diff(entry["config"], current["config"])
        if diff:
            raise CheckpointMismatchError(f"exit {entry['path']!r}: config mismatch: " + "; ".join(diff))
        state = {name[len(key) + 1:]: t for name, t in tensors.items() if name.startswith(key + "/")}
        own = module.state_dict()
        for name, t in own.items():
            if name not in state:
                raise CheckpointMismatchError(f"exit {entry['path']!r}: checkpoint lacks {name!r}")
            if state[name].shape != t.shape:
                raise CheckpointMismatchError(f"exit {entry['path']!r}: {name!r} has shape {tuple(state[name].shape)} "
                                              f"in the checkpoint, {tuple(t.shape)} in the model")
        module.load_state_dict(state, strict=True)


def exit_from_metadata(entry: dict[str, Any]) -> torch.nn.Module:
    """Rebuild an exit module (random weights) from one checkpoint metadata entry."""
    if entry["type"] == "SLViTExit":
        return SLViTExit(SLViTConfig.from_dict(entry["config"]))
    if entry["type"] == "CNNExit":
        return CNNExit(CNNExitConfig.from_dict(entry["config"]))
    raise CheckpointMismatchError(f"unknown exit type {entry['type']!r} in checkpoint")


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
