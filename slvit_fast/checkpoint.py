"""Exit checkpoints that cannot run code and cannot be half-written.

* Exit weights go to a safetensors file (tensors only) with each exit's type, module path and config
  stored as JSON metadata - loading never unpickles anything.
* Training state (optimizer and scheduler state, epoch, history) goes through ``torch.save`` and is
  read back with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
* Loading is all or nothing: every tensor and config is checked against the network before the first
  copy, so a checkpoint that does not fit leaves the network unchanged.
* Every write goes to a temporary file in the same folder, is flushed to disk, then atomically
  renamed over the target: a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .cnn_exit import CNNExit
from .config import CNNExitConfig, SLViTConfig
from .errors import CheckpointMismatchError
from .slvit_exit import SLViTExit

FORMAT = "slvit_fast.exits/1"


def _umask() -> int:
    """The process umask, read without changing it where the OS shows it (os.umask can only swap it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``. The file gets the permissions an
    ordinary ``open(path, "w")`` would give it - a replaced file's own, else 0666 & ~umask (mkstemp's
    temporary file is private: 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:  # a file it replaces keeps its mode, as open(path, "w") would keep it
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
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


def _open_error(path: str | os.PathLike, err: Exception) -> Exception:
    """A load error that names the file and says what is wrong with it."""
    return CheckpointMismatchError(f"{path}: not a readable safetensors file ({err}); expected a file written by "
                                   "save_exits / net.save_exits")


def _check_file(path: str | os.PathLike) -> None:
    if os.path.isdir(path):
        found = sorted(p.name for p in Path(path).glob("*.safetensors"))
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise IsADirectoryError(errno.EISDIR, f"load_exits needs the .safetensors file written by save_exits, "
                                              f"not a directory{hint}", str(path))


def read_exit_metadata(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``exits`` list of a checkpoint's metadata (type, module path, config of each exit), checked."""
    from safetensors import SafetensorError, safe_open

    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise _open_error(path, e) from None
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: not a slvit_fast exits checkpoint (format {meta.get('format')!r})")
    if "exits" not in meta:
        raise CheckpointMismatchError(f"{path}: the metadata has no 'exits' entry (the list of exits with their "
                                      f"types and configs); metadata keys: {sorted(meta)}")
    try:
        exits = json.loads(meta["exits"])
    except json.JSONDecodeError as e:
        raise CheckpointMismatchError(f"{path}: the metadata 'exits' entry is not valid JSON ({e.msg} at "
                                      f"character {e.pos})") from None
    if not isinstance(exits, list):
        raise CheckpointMismatchError(f"{path}: the metadata 'exits' entry must be a list, got {type(exits).__name__}")
    for i, entry in enumerate(exits):
        lacking = [k for k in ("key", "path", "type", "config") if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise CheckpointMismatchError(f"{path}: metadata entry {i} of 'exits' lacks {lacking}: {entry!r}")
    return exits


def _load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _open_error(path, e) from None


def _plan(net: torch.nn.Module, saved: list[dict], tensors: dict[str, torch.Tensor]):
    """Match every checkpoint tensor to an exit tensor; every problem found, or the per-exit states."""
    problems, states = [], []
    claimed: set[str] = set()
    for entry, (key, module) in zip(saved, net.exits.items()):
        where = f"exit {entry['path']!r}"
        current = _describe(module)
        if entry["type"] != current["type"]:
            problems.append(f"{where}: checkpoint holds a {entry['type']}, the network a {current['type']}")
        diff = _config_diff(entry["config"], current["config"])
        if diff:
            problems.append(f"{where}: config mismatch: " + "; ".join(diff))
        state = {name[len(key) + 1:]: t for name, t in tensors.items() if name.startswith(key + "/")}
        claimed.update(f"{key}/{n}" for n in state)
        own = module.state_dict()
        for name, t in own.items():
            if name not in state:
                problems.append(f"{where}: checkpoint lacks {name!r}")
            elif state[name].shape != t.shape:
                problems.append(f"{where}: {name!r} has shape {tuple(state[name].shape)} in the checkpoint, "
                                f"{tuple(t.shape)} in the model")
        problems.extend(f"{where}: unexpected tensor {n!r} in the checkpoint" for n in sorted(set(state) - set(own)))
        states.append(state)
    problems.extend(f"tensor {n!r} belongs to no exit" for n in sorted(set(tensors) - claimed))
    return problems, states


def load_exits(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load exits saved by :func:`save_exits`, all or nothing.

    Everything is checked before anything is copied - exit paths, types, configs, every tensor's name
    and shape, tensors that belong to no exit - and one error lists every problem; on any error the
    network is left exactly as it was. Weights holding NaN or Inf load, with a warning naming them.
    """
    saved = read_exit_metadata(path)
    keys = list(net.exits.keys())
    if [e["key"] for e in saved] != keys:
        raise CheckpointMismatchError(
            f"{path}: checkpoint has exits at {[e['path'] for e in saved]}, the network at {list(net.exit_paths)}"
        )
    tensors = _load_tensors(path)
    problems, states = _plan(net, saved, tensors)
    if problems:
        raise CheckpointMismatchError(f"{path}: does not fit this network, nothing was loaded:\n  " + "\n  ".join(problems))
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(f"{path}: non-finite values (NaN or Inf) in {len(bad)} tensor(s): {', '.join(sorted(bad))}",
                      RuntimeWarning, stacklevel=2)
    backup = [{n: t.detach().clone() for n, t in m.state_dict().items()} for m in net.exits.values()]
    try:
        for state, module in zip(states, net.exits.values()):
            module.load_state_dict(state, strict=True)
    except BaseException:  # not expected after the checks above; still all or nothing
        for state, module in zip(backup, net.exits.values()):
            module.load_state_dict(state, strict=True)
        raise


def exit_from_metadata(entry: dict[str, Any]) -> torch.nn.Module:
    """Rebuild an exit module (random weights) from one checkpoint metadata entry."""
    if entry["type"] == "SLViTExit":
        return SLViTExit(SLViTConfig.from_dict(entry["config"]))
    if entry["type"] == "CNNExit":
        return CNNExit(CNNExitConfig.from_dict(entry["config"]))
    raise CheckpointMismatchError(f"unknown exit type {entry['type']!r} in checkpoint")
