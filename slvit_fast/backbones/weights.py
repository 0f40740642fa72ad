"""Backbone weights for the presets: a state_dict, a file, or a torchvision weights name.

``read_weights(name, weights)`` turns what the user passed into a ``state_dict`` plus a description;
``load_into(backbone, state, classifier, ...)`` loads it, replacing a classifier whose shape differs
(timm's ``num_classes`` behaviour: ImageNet weights, 10 classes -> the backbone keeps every weight but
gets a new, randomly initialised 10-way classifier) and reporting every other mismatch at once.

Nothing is downloaded behind the user's back except by a torchvision weights name, which goes through
torchvision's own cache (``$TORCH_HOME/hub/checkpoints``); when that download fails (offline), the
error names the URL, the file torchvision looks for and how to pass a local copy instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

log = logging.getLogger("slvit_fast.presets")

__all__ = ["WeightsUnavailableError", "read_weights", "load_into", "torchvision_weights", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


class WeightsUnavailableError(RuntimeError):
    """A torchvision weights name whose file is not cached and cannot be downloaded (e.g. offline)."""


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(WEIGHT_SUFFIXES) or os.sep in text or "/" in text


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded object: plain, or under 'state_dict'/'model'; DDP 'module.' prefix removed."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights {source}: expected a state_dict (a mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file (loaded with ``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist" if not p.exists()
                                else f"weights path {str(p)!r} is not a file")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file as st_load

        try:
            return st_load(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"weights file {str(p)!r} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights file {str(p)!r} could not be read as a torch state_dict "
                         f"(torch.load(weights_only=True)): {e}") from None
    return _unwrap(obj, repr(str(p)))


def torchvision_weights(builder: str, text: str):
    """The torchvision weights enum entry for ``text`` ("IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2")."""
    import torchvision

    enum = torchvision.models.get_model_weights(builder)
    key = text.split(".", 1)[1] if text.startswith(enum.__name__ + ".") else text
    if key not in enum.__members__:
        raise ValueError(f"unknown weights {text!r} for {builder}: not a file, and torchvision's {enum.__name__} "
                         f"has {list(enum.__members__)}; pass a state_dict, a .pt/.pth/.safetensors file or one of those")
    return enum[key]


def _download(entry, builder: str) -> dict[str, torch.Tensor]:
    url = entry.url
    filename = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return dict(entry.get_state_dict(progress=False, check_hash=True))
    except Exception as e:  # URLError, socket errors, HTTP errors, hash mismatch...
        raise WeightsUnavailableError(
            f"cannot get torchvision weights {type(entry).__name__}.{entry.name} for {builder}: downloading {url} "
            f"failed ({type(e).__name__}: {e}). Offline? Fetch that file on a connected machine, then either put "
            f"it at {cached} (torchvision's cache) or pass it directly: weights='/path/to/{filename}' "
            f"(slvit-fast: --weights /path/to/{filename})") from None


def read_weights(builder: str | None, weights: Any) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(state_dict, description, from_torchvision) for ``weights``: a mapping, a file path, or a
    torchvision weights name of ``builder`` (None: the backbone has no torchvision weights)."""
    if isinstance(weights, nn.Module):
        return dict(weights.state_dict()), f"the state of a {type(weights).__name__}", False
    if isinstance(weights, Mapping):
        return _unwrap(weights, "(mapping)"), "a state_dict", False
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a state_dict, a file path or a torchvision weights name, "
                        f"got {type(weights).__name__}")
    text = os.fspath(weights)
    if Path(text).exists() or _looks_like_path(text):
        return load_file(text), f"file {text}", False
    if builder is None:
        raise ValueError(f"weights {text!r} is not an existing file, and this backbone has no torchvision weights")
    entry = torchvision_weights(builder, text)
    return _download(entry, builder), f"torchvision {type(entry).__name__}.{entry.name}", True


def load_into(backbone: nn.Module, state: Mapping[str, torch.Tensor], classifier: str | None, source: str,
              name: str, drop_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``backbone``; returns the notes (classifier replaced, keys ignored).

    A classifier (``classifier`` module path) whose weight shape differs from the backbone's is not
    loaded: the backbone keeps its new randomly initialised classifier. Keys under ``drop_prefixes``
    (e.g. Inception-v3's ``AuxLogits.``, which the presets do not build) are ignored. Any other
    missing, unexpected or mis-shaped key is an error listing all of them.
    """
    state = dict(state)
    notes: list[str] = []
    own = backbone.state_dict()
    dropped = sorted(k for k in state if k.startswith(drop_prefixes)) if drop_prefixes else []
    if dropped:
        for k in dropped:
            del state[k]
        notes.append(f"{name}: ignored {len(dropped)} weights under {', '.join(drop_prefixes)} (not built by the preset)")
    replaced: list[str] = []
    if classifier is not None:
        ckeys = [f"{classifier}.weight", f"{classifier}.bias"]
        w = state.get(ckeys[0])
        if w is not None and ckeys[0] in own and tuple(w.shape) != tuple(own[ckeys[0]].shape):
            for k in ckeys:
                state.pop(k, None)
            replaced = ckeys
            notes.append(f"{name}: the weights' classifier {classifier!r} has {w.shape[0]} outputs; replaced by a new "
                         f"randomly initialised {own[ckeys[0]].shape[0]}-output {classifier!r} (train it before "
                         f"trusting the final output)")
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: {tuple(state[k].shape)} in the weights vs {tuple(own[k].shape)}" for k in state
             if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:4]}{' ...' if len(shape) > 4 else ''}")
        raise ValueError(f"weights from {source} do not fit backbone {name!r}: " + "; ".join(parts))
    backbone.load_state_dict(state, strict=not replaced)
    for n in notes:
        log.warning("%s", n)
    return notes
