"""Cache branch features on disk once, so later epochs of exit training skip the backbone entirely.

The backbone is frozen in classifier-wise training, so the features feeding each exit never change:
computing them once per sample and reading them back from memory-mapped ``.npy`` files (written chunk
by chunk, one batch at a time) turns every later epoch into exit-only work. Augmentation is frozen
too: a cached epoch sees the same inputs every time.

A cache folder is built in a fresh hidden sibling folder and published with one atomic rename, so a
folder with the final name is always complete; ``meta.json`` records the fingerprint of what made the
features (:mod:`.fingerprint`), every file's size and a CRC-32 of every file (computed in the build
folder before the rename, so a published cache always has them). Opening a cache checks all of them
before any data is served: one flipped byte in a feature or label file is an error naming the file, not
a silently different training run. CRC-32 (zlib) runs at ~2 GB/s from the page cache on one core of
this project's machine (about 3x blake2b's speed); it is a guard against damage, not against tampering. Which
folder a run reads is decided in :mod:`.cache_store`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .output import progress_bar

log = logging.getLogger("slvit_fast.training")

CHECKSUM = "crc32"
_BLOCK = 16 << 20  # bytes read per step of a checksum: large enough to run at memory speed, small in RAM
_LOG_VERIFY_BYTES = 256 << 20  # a cache this large takes about a second or more to verify: say so

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


def outdated(directory: Path) -> FeatureCacheError:
    return FeatureCacheError(f"feature cache {directory} was written by an older slvit_fast that recorded no "
                             "checksums, so its contents cannot be verified; delete that folder, or pass "
                             "cache_policy='rebuild' to train_exits, to build it again")


def file_checksum(path: Path) -> str:
    """CRC-32 of a whole file, read in 16 MB blocks into one reused buffer (a cache can be many GB)."""
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _meta_checksum(meta: dict[str, Any]) -> str:
    """CRC-32 of ``meta`` without its own checksum, so a damaged meta.json (e.g. a file checksum) is caught too."""
    body = {**meta, "checksums": {k: v for k, v in meta["checksums"].items() if k != "meta"}}
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


def with_checksums(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus the checksum of every data file of ``meta["files"]`` in ``directory``, and of meta itself."""
    meta = json.loads(json.dumps(meta))  # checksum meta exactly as it will read back (tuples, non-str keys)
    sums = {name: file_checksum(directory / name) for name in meta["files"]}
    meta["checksums"] = {"algorithm": CHECKSUM, "files": sums}
    meta["checksums"]["meta"] = _meta_checksum(meta)
    return meta


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureCache:
    """Memory-mapped branch features, targets and final outputs of one dataset split."""

    def __init__(self, directory: str | Path, *, _verify: bool = True):
        """Open the cache at ``directory`` after checking every file against meta.json (FeatureCacheError if not).

        ``_verify=False`` skips the checksum pass: only for a cache this process has just written.
        """
        self.directory = directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no complete feature cache (meta.json missing)")
        try:
            self.meta = json.loads(meta_path.read_text())
            if not isinstance(self.meta, dict):
                raise TypeError(f"a JSON {type(self.meta).__name__}, not an object")
            if "checksums" not in self.meta:
                raise outdated(directory)
            checksums = self.meta["checksums"]
            algorithm = checksums["algorithm"]
            stored_meta_sum = checksums["meta"]
            sums = dict(checksums["files"])
            sizes = dict(self.meta["files"])
            self.size = int(self.meta["size"])
            num_exits = int(self.meta["num_exits"])
            has_extra = list(self.meta["has_extra"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise damaged(directory, f"meta.json unreadable: {type(e).__name__}: {e}") from None
        if algorithm != CHECKSUM:
            raise damaged(directory, f"meta.json names checksum {algorithm!r}, this slvit_fast knows {CHECKSUM!r}")
        if _meta_checksum(self.meta) != stored_meta_sum:
            raise damaged(directory, "meta.json does not match its own checksum")
        needed = ([f"feat{i}.npy" for i in range(num_exits)] + ["targets.npy", "final.npy"]
                  + [f"extra{i}.npy" for i, has in enumerate(has_extra) if has])
        for name in needed:
            if name not in sums or name not in sizes:
                raise damaged(directory, f"meta.json records no checksum or size for {name}")
        for name, size in sizes.items():  # sizes first: a truncated file is named without reading everything
            path = directory / name
            if not path.exists():
                raise damaged(directory, f"{name} is missing")
            if path.stat().st_size != size:
                raise damaged(directory, f"{name} has {path.stat().st_size} bytes, {size} were written")
        if _verify:
            self._verify_checksums(sums, sizes)

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

    def _verify_checksums(self, sums: dict[str, str], sizes: dict[str, int]) -> None:
        total = sum(sizes.values())
        if total >= _LOG_VERIFY_BYTES:
            log.info("verifying the checksums of feature cache %s (%.0f MB)", self.directory, total / 1e6)
        for name, expected in sums.items():
            actual = file_checksum(self.directory / name)
            if actual != expected:
                raise damaged(self.directory, f"{name} does not match the {CHECKSUM} checksum recorded when it was "
                                              f"written: {actual}, expected {expected}")

    @classmethod
    def unverifiable(cls, directory: str | Path) -> bool:
        """True if ``directory`` holds a cache from before checksums were recorded (its data cannot be checked)."""
        try:
            meta = json.loads((Path(directory) / "meta.json").read_text())
        except (OSError, ValueError):
            return False  # opening it reports the damage
        return isinstance(meta, dict) and "checksums" not in meta

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
            meta = with_checksums(tmp, meta)  # before the publish: a folder with the final name always has them
            (tmp / "meta.json").write_text(json.dumps(meta))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            publish(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(directory, _verify=False)  # checksummed from these very files a moment ago

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
