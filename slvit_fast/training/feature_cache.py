"""Cache branch features on disk once, so later epochs of exit training skip the backbone entirely.

The backbone is frozen in classifier-wise training, so the features feeding each exit never change:
computing them once per sample and reading them back from memory-mapped ``.npy`` files (written chunk
by chunk, one batch at a time) turns every later epoch into exit-only work. A cache is valid only
once its ``meta.json`` exists (written last, atomically); an interrupted build is rebuilt.
Augmentation is frozen too: a cached epoch sees the same inputs every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write

_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32}


def _split(feature: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return tuple(feature) if isinstance(feature, (tuple, list)) else (feature, None)  # type: ignore[return-value]


def as_inputs(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class FeatureCache:
    """Memory-mapped branch features, targets and final outputs of one dataset split."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: no complete feature cache (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        self.size = self.meta["size"]
        load = lambda name: np.load(self.directory / f"{name}.npy", mmap_mode="r")  # noqa: E731
        self.features = [load(f"feat{i}") for i in range(self.meta["num_exits"])]
        self.extras = [load(f"extra{i}") if has else None for i, has in enumerate(self.meta["has_extra"])]
        self.targets = load("targets")
        self.finals = load("final")

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / "meta.json").exists()

    @classmethod
    @torch.no_grad()
    def build(cls, net: torch.nn.Module, loader, directory: str | Path, progress: bool = True,
              desc: str = "caching features") -> "FeatureCache":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "meta.json").unlink(missing_ok=True)
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
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
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
        if offset != size:
            raise RuntimeError(f"loader produced {offset} samples but its dataset has {size}")
        for a in arrays.values():
            a.flush()
        meta = {"size": size, "num_exits": len(has_extra), "has_extra": has_extra}
        atomic_write(directory / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
        return cls(directory)

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
