"""Which feature cache a run reads: one folder per fingerprint, built once under a lock.

Layout: ``<cache_dir>/<split>/<digest>/`` holds a complete cache whose ``meta.json`` carries the full
fingerprint; ``<digest>`` is a hash of it. Runs on different data (or weights, exits, dtype) use
different folders, so they never write the same file; runs on the same data take an ``fcntl`` lock on
``<split>/.<digest>.lock`` so only one builds while the others wait and then read its result. A
build goes to a hidden temporary folder and is published by one rename (see ``FeatureCache.build``),
so readers only ever open a complete cache.

``cache_policy``: ``"auto"`` (default) reads the matching cache or builds it, logging which fields
differ from the newest other cache in the folder; ``"strict"`` raises ``FeatureCacheMismatchError``
instead of building when the folder holds caches but none matches; ``"rebuild"`` always builds anew.

A matching cache is verified against the checksums in its ``meta.json`` when opened; a damaged one
raises ``FeatureCacheError`` under every policy (it says how to rebuild). A matching cache written by
an older slvit_fast has no checksums, so it cannot be verified: it does not fit this run, like a cache
with another fingerprint, so ``"auto"`` builds it again in place (logging why) and ``"strict"`` raises
``FeatureCacheMismatchError``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from . import distributed as D
from .feature_cache import FeatureCache, FeatureCacheMismatchError
from .fingerprint import differences, digest, fingerprint

log = logging.getLogger("slvit_fast.training")

CACHE_POLICIES = ("auto", "strict", "rebuild")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is building the feature cache %s", path.stem.lstrip("."))
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _other_caches(split_dir: Path, name: str) -> list[tuple[float, Path, dict[str, Any] | None]]:
    """Complete caches in ``split_dir`` other than ``name``, newest first: (mtime, folder, fingerprint)."""
    found = []
    candidates = [split_dir] + [p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for folder in candidates:
        meta = folder / "meta.json"
        if folder.name == name or not meta.exists():
            continue
        try:
            mtime = meta.stat().st_mtime
        except OSError:  # replaced by a concurrent rebuild just now
            continue
        try:
            fp = json.loads(meta.read_text()).get("fingerprint")
        except (OSError, ValueError):
            fp = None
        found.append((mtime, folder, fp))
    return sorted(found, key=lambda t: t[0], reverse=True)


def open_cache(net: nn.Module, loader, split_dir: str | Path, *, policy: str = "auto", cache_key: str | None = None,
               progress: bool = True, desc: str = "caching features", backbone_hash: str | None = None
               ) -> tuple[FeatureCache, float]:
    """The cache of ``loader``'s features through ``net`` under ``split_dir``: (cache, seconds spent building)."""
    if policy not in CACHE_POLICIES:
        raise ValueError(f"cache_policy must be one of {CACHE_POLICIES}, got {policy!r}")
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(net, loader, cache_key, backbone_hash)
    name = digest(fp)
    folder = split_dir / name
    unverifiable = policy != "rebuild" and FeatureCache.exists(folder) and FeatureCache.unverifiable(folder)
    if unverifiable:
        why = (f"feature cache {folder} was written by an older slvit_fast that recorded no checksums, "
               "so its contents cannot be verified")
        if policy == "strict":
            raise FeatureCacheMismatchError(f"{why}; pass cache_policy='auto' or 'rebuild' to build it again, "
                                            "or delete that folder")
        log.info("%s; building it again", why)
    elif policy != "rebuild" and FeatureCache.exists(folder):
        return _checked(FeatureCache(folder), fp), 0.0

    if policy != "rebuild" and not unverifiable:
        others = _other_caches(split_dir, name)
        if others:
            _, newest, old_fp = others[0]
            changed = "; ".join(differences(old_fp, fp))
            if policy == "strict":
                raise FeatureCacheMismatchError(
                    f"feature cache in {split_dir} does not match this run (newest: {newest.name}; changed: {changed}); "
                    "pass cache_policy='auto' to build a matching cache next to it, or use another cache_dir")
            log.info("feature cache %s: no cache matches this run (changed since %s: %s); building %s",
                     split_dir, newest.name, changed, name)
    if D.is_distributed():
        raise NotImplementedError("build the feature cache before launching distributed training")

    with _locked(split_dir / f".{name}.lock"):
        # Holding the lock: no other process builds this fingerprint now, so leftovers of killed builds go.
        for stale in split_dir.glob(f".{name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        if policy != "rebuild" and FeatureCache.exists(folder) and not FeatureCache.unverifiable(folder):
            return _checked(FeatureCache(folder), fp), 0.0  # another process built it while we waited
        t0 = time.perf_counter()
        cache = FeatureCache.build(net, loader, folder, progress, desc, fingerprint=fp)
        return cache, time.perf_counter() - t0


def _checked(cache: FeatureCache, fp: dict[str, Any]) -> FeatureCache:
    if cache.fingerprint != fp:  # a digest collision, or a folder renamed by hand
        raise FeatureCacheMismatchError(f"feature cache {cache.directory} does not hold the features its name says "
                                        f"(changed: {'; '.join(differences(cache.fingerprint, fp))}); delete it")
    return cache
