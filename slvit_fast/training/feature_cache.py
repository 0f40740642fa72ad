"""Cache branch features on disk once, so later epochs of exit training skip the backbone entirely.

The backbone is frozen in classifier-wise training, so the features feeding each exit never change:
computing them once per sample and reading them back from memory-mapped ``.npy`` files (written chunk
by chunk, one batch at a time) turns every later epoch into exit-only work. Augmentation is frozen
too: a cached epoch sees the same inputs every time.

A cache folder is built in a fresh hidden sibling folder and published with one atomic rename, so a
folder with the final name is always complete; ``meta.json`` records the fingerprint of what made the
features (:mod:`.fingerprint`) and every file's size, checked on open. Which folder a run reads is
decided in :mod:`.cache_store`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .output import progress_bar

_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32}


class FeatureCacheError(RuntimeError):
    """A feature cache folder is incomplete, damaged or does not fit the network; the message says how to fix it."""


class FeatureCacheMismatchError(FeatureCacheError, ValueError):
    """``cache_policy="strict"``: the existing cache was made by another backbone, exits, dtype or data."""


def _split(feature: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return tuple(feature) if isinstance(feature, (tuple, list)) else (feature, None)  # type: ignore[return-value]


def as_inputs(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def damaged(directory: Path, what: str) -> FeatureCacheError:
    return FeatureCacheError(f"feature cache {directory} is incomplete or damaged ({what}); delete that folder, or "
                             "pass cache_policy='rebuild' to train_exits, to build it again")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureCache:
    """Memory-mapped branch features, targets and final outputs of one dataset split."""

    def __init__(self, directory: str | Path):
        self.directory = directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no complete feature cache (meta.json missing)")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.size = int(self.meta["size"])
            num_exits = int(self.meta["num_exits"])
            has_extra = list(self.meta["has_extra"])
        except (ValueError, KeyError, TypeError) as e:
            raise damaged(directory, f"meta.json unreadable: {type(e).__name__}: {e}") from None
        for name, size in self.meta.get("files", {}).items():  # caches from before sizes were recorded: no check
            path = directory / name
            if not path.exists():
                raise damaged(directory, f"{name} is missing")
            if path.stat().st_size != size:
                raise damaged(directory, f"{name} has {path.stat().st_size} bytes, {size} were written")

        def load(name: str) -> np.ndarray:
            try:
                a = np.load(directory / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as e:
                raise damaged(directory, f"{name}.npy: {e}") from None
            if a.shape[0] != self.size:
                raise damaged(directory, f"{name}.npy holds {a.shape[0]} samples, meta.json says {self.size}")
            return a

        self.features = [load(f"feat{i}") for i in range(num_exits)]
        self.extras = [load(f"extra{i}") if has else None for i, has in enumerate(has_extra)]
        self.targets = load("targets")
        self.finals = load("final")

    @property
    def num_exits(self) -> int:
        return len(self.features)

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.meta.get("fingerprint")

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / "meta.json").exists()

    @classmethod
    @torch.no_grad()
    def build(cls, net: torch.nn.Module, loader, directory: str | Path, progress: bool = True,
              desc: str = "caching features", fingerprint: dict[str, Any] | None = None) -> "FeatureCache":
        """Run the backbone over ``loader`` once and publish the features at ``directory`` atomically.

        An existing cache at ``directory`` is replaced (readers that already opened it keep their data).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.build-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = cls._write(net, loader, tmp, progress, desc)
            meta["fingerprint"] = fingerprint
            (tmp / "meta.json").write_text(json.dumps(meta))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            publish(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(directory)

    @staticmethod
    def _write(net: torch.nn.Module, loader, directory: Path, progress: bool, desc: str) -> dict[str, Any]:
        size = len(loader.dataset)
        device = next(net.parameters()).device
        arrays: dict[str, np.ndarray] = {}
        has_extra: list[bool] = []
        offset = 0

        def store(name: str, t: torch.Tensor) -> None:
            t = t.detach().cpu()
            if name not in arrays:
                arrays[name] = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+",
                                                         dtype=_TORCH_TO_NP[t.dtype], shape=(size, *t.shape[1:]))
            arrays[name][offset:offset + t.shape[0]] = t.numpy()

        net.eval()
        try:
            total = len(loader)
        except TypeError:
            total = None
        bar = progress_bar(total, desc, progress)
        for x, y in loader:
            bar.update(1)
            inputs = tuple(t.to(device) for t in as_inputs(x))
            *features, final = net.branch_features(*inputs)
            for i, feature in enumerate(features):
                feat, extra = _split(feature)
                store(f"feat{i}", feat)
                if offset == 0:
                    has_extra.append(extra is not None)
                if extra is not None:
                    store(f"extra{i}", extra)
            store("targets", torch.as_tensor(y))
            store("final", final)
            offset += final.shape[0]
        bar.close()
        if offset != size:
            raise RuntimeError(f"loader produced {offset} samples but its dataset has {size}")
        for a in arrays.values():
            a.flush()
        del arrays  # close the memory maps before the sizes are recorded and the folder is renamed
        files = {p.name: p.stat().st_size for p in sorted(directory.glob("*.npy"))}
        return {"size": size, "num_exits": len(has_extra), "has_extra": has_extra, "files": files}

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*.npy"))

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[list[Any], torch.Tensor, torch.Tensor]]:
        """Yield (per-exit features, targets, final outputs); ``shard=(rank, world)`` as DistributedSampler."""
        order = np.random.default_rng(seed).permutation(self.size) if shuffle else np.arange(self.size)
        rank, world = shard
        order = order[rank::world]
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size]) if shuffle else order[start:start + batch_size]
            feats = []
            for f, e in zip(self.features, self.extras):
                ft = torch.from_numpy(np.ascontiguousarray(f[idx]))
                feats.append(ft if e is None else (ft, torch.from_numpy(np.ascontiguousarray(e[idx]))))
            yield feats, torch.from_numpy(np.ascontiguousarray(self.targets[idx])), \
                torch.from_numpy(np.ascontiguousarray(self.finals[idx]))

    def num_batches(self, batch_size: int, world: int = 1) -> int:
        per_rank = -(-self.size // world)
        return -(-per_rank // batch_size)


def publish(tmp: Path, directory: Path) -> None:
    """Atomically give the complete folder ``tmp`` the name ``directory`` (replacing an old one)."""
    old = None
    if directory.exists():
        # A folder cannot be renamed over a non-empty one: move the old one aside first. Processes that
        # have it open keep reading it (open files and maps survive unlinking).
        old = directory.parent / f".{directory.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
