"""What determines a split's cached features, as a small JSON-able dict, so a stale cache is never read.

Fields (each compared on its own, so a mismatch can say which one changed):

* ``backbone``: a blake2b hash over every parameter *and buffer* (name, dtype, shape, bytes; BatchNorm
  running statistics change features too) plus the module's ``repr`` (the architecture). On a
  torchvision resnet152 (241 MB of tensors) this takes about 0.4 s on one core of this project's machine.
* ``exits``: each exit's module path, extra-input path and the shape of the features it reads (from
  a fake-tensor forward of one sample: no real compute).
* ``dtype``: parameter and input dtypes.
* ``data``: the number of samples and a hash of the first and the last batch (inputs and targets,
  in dataset order), or the user's ``cache_key`` instead of the hashes (e.g. when the data are
  augmented at random, so their bytes differ every run).
"""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from numbers import Number
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

FORMAT = 2  # cache layout version: part of the fingerprint, so a layout change rebuilds old caches


def _update(h: "hashlib._Hash", obj: Any) -> None:
    """Feed a sample (tensors, arrays, numbers, strings, nested tuples/lists/dicts) to a hash."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, (tuple, list)):
        h.update(f"L{len(obj)}".encode())
        for o in obj:
            _update(h, o)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _update(h, str(k))
            _update(h, obj[k])
    elif isinstance(obj, (str, bytes, Number, type(None))):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    elif hasattr(obj, "__array__"):  # PIL images and friends
        _update(h, np.asarray(obj))
    else:
        raise TypeError(f"cannot fingerprint a sample element of type {type(obj).__name__}; "
                        "pass cache_key='...' to name the data yourself")


def tensors_hash(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(module).encode())
    for name, t in chain(module.named_parameters(), module.named_buffers()):
        h.update(name.encode())
        _update(h, t)
    return h.hexdigest()


def _items_hash(dataset, indices: range) -> str:
    h = hashlib.blake2b(digest_size=16)
    for i in indices:
        _update(h, dataset[i])
    return h.hexdigest()


def _first_input(sample: Any) -> tuple | None:
    """A one-sample batch of the backbone inputs of a dataset item ``(x, y)`` (None if it has no tensor form)."""
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    try:
        return tuple(torch.as_tensor(t).unsqueeze(0) for t in xs)
    except (TypeError, ValueError, RuntimeError):
        return None  # the exits' input shapes are then not part of the fingerprint (the hashes still are)


def data_fingerprint(loader, cache_key: str | None) -> tuple[dict[str, Any], tuple | None]:
    """``({"samples", "first", "last"} or {"samples", "cache_key"}, one-sample inputs or None)``."""
    dataset = getattr(loader, "dataset", None)
    indexable = (dataset is not None and not isinstance(dataset, IterableDataset)
                 and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"))
    if indexable:
        n = len(dataset)
        example = _first_input(dataset[0]) if n else None
        if cache_key is not None:
            return {"samples": n, "cache_key": str(cache_key)}, example
        bs = max(1, min(getattr(loader, "batch_size", None) or 1, n))
        return {"samples": n, "first": _items_hash(dataset, range(0, bs)),
                "last": _items_hash(dataset, range(n - bs, n))}, example
    # Not indexable: one pass over the loader (no backbone) to count and hash its first and last batch.
    n, first, last, example = 0, None, None, None
    for batch in loader:
        h = hashlib.blake2b(digest_size=16)
        _update(h, batch)
        first = first or h.hexdigest()
        last = h.hexdigest()
        x = batch[0]
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        example = example or tuple(t[:1] for t in xs)
        n += xs[0].shape[0]
    if cache_key is not None:
        return {"samples": n, "cache_key": str(cache_key)}, example
    return {"samples": n, "first": first, "last": last}, example


def exits_fingerprint(net: nn.Module, example: tuple | None) -> list[dict[str, Any]]:
    shapes: dict[str, Any] = {}
    if example is not None and hasattr(net, "feature_shapes"):
        try:
            shapes = net.feature_shapes(*example)
        except Exception as e:  # noqa: BLE001 - shapes are a courtesy field; the hashes still key the cache
            shapes = {"error": f"{type(e).__name__}"}

    def shape(path):
        s = shapes.get(path) if path else None
        return list(s[1:]) if isinstance(s, (tuple, list)) and s and isinstance(s[0], int) else s

    paths = list(net.exit_paths)
    modules = getattr(net, "exit_modules", None) or [p.split("#", 1)[0] for p in paths]
    extras = getattr(net, "extra_paths", None) or [None] * len(paths)
    return [{"path": p, "extra": e, "input_shape": shape(m), "extra_shape": shape(e)}
            for p, m, e in zip(paths, modules, extras)]


def fingerprint(net: nn.Module, loader, cache_key: str | None = None, backbone_hash: str | None = None
                ) -> dict[str, Any]:
    """Everything that determines the cached features of ``loader`` through ``net``'s frozen backbone."""
    data, example = data_fingerprint(loader, cache_key)
    params = next(chain(net.backbone.parameters(), net.backbone.buffers()), None)
    return {
        "format": FORMAT,
        "backbone": backbone_hash or tensors_hash(net.backbone),
        "exits": exits_fingerprint(net, example),
        "dtype": {"parameters": str(params.dtype) if params is not None else None,
                  "inputs": [str(t.dtype) for t in example] if example is not None else None},
        "data": data,
    }


def digest(fp: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(fp, sort_keys=True).encode(), digest_size=8).hexdigest()


def differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """Human-readable list of the fields that differ, e.g. ``["data.samples: 64 -> 32", "backbone"]``."""
    if not old:
        return ["no fingerprint (a cache written by an older slvit_fast)"]
    out = []
    for key in new:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif key == "backbone":
            out.append("backbone (parameters, buffers or architecture)")
        elif key == "exits" and isinstance(a, list) and len(a) != len(b):
            out.append(f"exits: {len(a)} -> {len(b)} exits ({[e['path'] for e in a]} -> {[e['path'] for e in b]})")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
