"""Labelled images for the train/evaluate workflow: an ImageFolder directory or an ``.npz`` file.

``load_images(path)`` accepts

* a directory laid out like ``torchvision.datasets.ImageFolder``: ``PATH/<class name>/<image>``
  (png, jpg, jpeg, bmp, gif, tif, tiff, webp); class ``i`` is the i-th class folder in sorted order.
  8-bit modes (L, RGB, RGBA, P, CMYK, ...) are converted to RGB and divided by 255; 16-bit grayscale
  ("I;16") is divided by 65535; 32-bit integer ("I") must hold 0..65535 and is divided by 65535 too;
  float ("F") must already be in [0, 1] (16-bit RGB PNGs are read by Pillow at 8 bits). Images are read
  lazily, one at a time, after a check of every file's header; a file that is not a readable image is a
  :class:`UsageError` naming it (a truncated one when it is decoded).
* an ``.npz`` file with arrays ``x`` and ``y``: ``x`` of shape ``(N, H, W)`` (grayscale),
  ``(N, C, H, W)`` or ``(N, H, W, C)`` with ``C`` 1 or 3 (``(N, C, H, W)`` is assumed when the second
  axis is 1 or 3); ``uint8`` pixels are divided by 255, other dtypes are used as they are. ``y``: ``N``
  labels of any type (ints, strings; NaN or infinite labels are an error); class ``i`` is the i-th
  distinct label in sorted order.

Every sample becomes a 3-channel float image of ``input_size x input_size`` (bilinear resize,
anti-aliased when shrinking; grayscale repeated to 3 channels), normalised per channel with
``mean``/``std``: ImageNet's for torchvision-pretrained weights, otherwise the training split's own
statistics (:func:`channel_stats`). Splits are a seeded random permutation (:func:`split_indices`), so
``slvit-fast evaluate`` rebuilds exactly the test split the run held out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import UsageError

_log = logging.getLogger("slvit_fast.workflow")

__all__ = ["Images", "ArrayImages", "FolderImages", "load_images", "split_indices", "channel_stats",
           "Prepared", "prepare", "loader", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _to_size(img: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) float -> (3, size, size)."""
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    if tuple(img.shape[1:]) != (size, size):
        shrink = img.shape[1] > size or img.shape[2] > size
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False,
                            antialias=shrink)[0]
    return img.contiguous()


class Images(Dataset):
    """Labelled images; ``raw(i)`` is sample i as a (3, size, size) float tensor before normalisation."""

    classes: list[str]
    source: str
    labels: torch.Tensor

    def __init__(self) -> None:
        self.size: int | None = None
        self.mean = torch.zeros(3)
        self.std = torch.ones(3)

    def configure(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.mean = torch.tensor([float(m) for m in mean]).view(3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(3, 1, 1)

    def raw(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        if self.size is None:
            raise RuntimeError("Images.configure(size, mean, std) first")
        return (self.raw(i) - self.mean) / self.std, self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return f"{len(self)} images, {self.num_classes} classes, from {self.source}"


class ArrayImages(Images):
    """Images held in memory: ``x`` (N, C, H, W) float tensor, ``labels`` (N,) int64."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, classes: list[str], source: str):
        super().__init__()
        self.x, self.labels, self.classes, self.source = x, labels, classes, source

    def raw(self, i: int) -> torch.Tensor:
        return _to_size(self.x[i], self.size)

    def describe(self) -> str:
        c, h, w = self.x.shape[1:]
        return f"{len(self)} images of {c}x{h}x{w}, {self.num_classes} classes, from {self.source}"


_warned_8bit_range = False


def _warn_8bit_range(path: str, mode: str, hi: float) -> None:
    """8-bit values stored in a 16/32-bit file (e.g. ``Image.fromarray(a.astype(np.uint16))``) are scaled by
    1/65535 like any 16-bit image and come out ~257x darker than the 8-bit path (review 10): say so, once."""
    global _warned_8bit_range
    if hi > 255 or _warned_8bit_range:
        return
    _warned_8bit_range = True
    _log.warning("%s: a %s-bit image (mode %r) whose values are all <= 255 (max %g): it is scaled by 1/65535 like "
                "any 16-bit image, so if it holds 8-bit values they come out ~257x darker; save 8-bit data as 8-bit "
                "images (shown once)", path, "16" if mode.startswith("I;16") else "32", mode, hi)


def _high_depth_gray(im, path: str) -> torch.Tensor:
    """A 16-bit ("I;16*"), 32-bit int ("I") or float ("F") grayscale PIL image as a (1, h, w) float in [0, 1].

    ``convert("RGB")`` would clip these at 255 (a 16-bit image turns black and white), so they are scaled
    by their real range instead: 16-bit by 65535 (a 16-bit copy of an 8-bit image gives the 8-bit path's
    values exactly); "I" - the mode tools and older Pillow use for 16-bit samples - must hold 0..65535 and is
    scaled the same way; "F" is used as it is and must already be in [0, 1]. Anything else is an error
    naming the file: a guessed scale would silently train on wrong pixels.
    """
    arr = np.asarray(im)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or im.mode == "I":
        _warn_8bit_range(path, im.mode, hi)
    if im.mode.startswith("I;16"):
        return torch.from_numpy(arr.astype(np.float32))[None] / 65535.0
    if im.mode == "I":
        if lo < 0 or hi > 65535:
            raise UsageError(f"{path}: a 32-bit integer image (mode 'I') with values in [{lo:.0f}, {hi:.0f}]; only "
                             f"0..65535 (16-bit samples) is supported: save it as an 8- or 16-bit image, or pass "
                             f"an .npz of floats in [0, 1]")
        return torch.from_numpy(arr.astype(np.float32))[None] / 65535.0
    if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
        raise UsageError(f"{path}: a floating-point image (mode 'F') must have finite values in [0, 1]; it has "
                         f"[{lo:.6g}, {hi:.6g}]: rescale it, or pass an .npz of floats")
    return torch.from_numpy(arr.astype(np.float32))[None]


def _unreadable(path: str, e: Exception) -> UsageError:
    # one line naming the file: the CLI prints a UsageError without a traceback
    return UsageError(f"{path}: not a readable image ({type(e).__name__}: {e})")


def _check_headers(files: list[str]) -> None:
    """Open every file's header (no pixel decoding, ~0.05 ms a file) so a file that is not an image stops the
    run before any work, not during evaluation; a truncated image is still found only when decoded."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path):
                pass
        except Exception as e:
            raise _unreadable(path, e) from None


def check_decodes(data: "Images", indices: Sequence[int]) -> int:
    """Decode the images at ``indices`` of an image folder (a no-op for in-memory arrays) so that a file that
    is truncated or otherwise undecodable past its header stops the run before training, not in the
    evaluation after it (the workflow passes the validation and test splits: the training split is decoded
    first thing by training itself). The number of files decoded."""
    files = getattr(data, "files", None)
    if files is None:
        return 0
    for i in indices:
        _read_image(files[i])
    return len(indices)


def _read_image(path: str) -> torch.Tensor:
    """One image file as a (C, h, w) float in [0, 1]: 8-bit modes via RGB, high bit depths by their range."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                return _high_depth_gray(im, path)
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UsageError:
        raise
    except Exception as e:  # not an image, truncated, unsupported format, decompression bomb...
        # raised where the image is decoded, also inside the (single-process) DataLoader during training
        raise _unreadable(path, e) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


class FolderImages(Images):
    """An ImageFolder directory, read lazily with PIL."""

    def __init__(self, files: list[str], labels: torch.Tensor, classes: list[str], source: str):
        super().__init__()
        self.files, self.labels, self.classes, self.source = files, labels, classes, source

    def raw(self, i: int) -> torch.Tensor:
        return _to_size(_read_image(self.files[i]), self.size)


def _labels(y: np.ndarray, source: str) -> tuple[torch.Tensor, list[str]]:
    if y.ndim != 1:
        raise UsageError(f"{source}: 'y' must be one label per sample (shape (N,)), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.inexact):
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:  # np.unique would make NaN a class named "nan" (one per NaN on older numpy)
            raise UsageError(f"{source}: 'y' has {bad.size} NaN or infinite label(s), the first at index "
                             f"{int(bad[0])} ({y[bad[0]]}); every sample needs a real label")
    try:
        values, index = np.unique(y, return_inverse=True)
    except TypeError as e:
        raise UsageError(f"{source}: labels in 'y' cannot be sorted ({e})") from None
    if len(values) < 2:
        raise UsageError(f"{source}: 'y' has {len(values)} distinct label(s); classification needs at least 2")
    return torch.from_numpy(index.astype(np.int64)), [str(v) for v in values]


def _guess_layout(shape: tuple[int, ...], src: str) -> str:
    """(N, C, H, W) or (N, H, W, C) from where a 1- or 3-channel axis is; refuses to guess between two."""
    first, last = shape[1] in (1, 3), shape[3] in (1, 3)
    if first and last:  # e.g. (N, 3, 32, 3): a wrong guess would silently train on scrambled pixels
        raise UsageError(f"{src}: 'x' of shape {shape} could be (N, C, H, W) or (N, H, W, C); add an array "
                         f"'layout' = 'NCHW' or 'NHWC' to the .npz (np.savez(..., layout='NHWC'))")
    if not first and not last:
        raise UsageError(f"{src}: 'x' of shape {shape}: expected (N, C, H, W) or (N, H, W, C) with C = 1 or 3")
    return "NCHW" if first else "NHWC"


def _load_npz(path: Path) -> ArrayImages:
    src = str(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise UsageError(f"{src}: an .npz needs arrays 'x' (images) and 'y' (labels); it has {f.files}")
            x, y = f["x"], f["y"]
            layout = str(f["layout"]) if "layout" in f.files else None
    except UsageError:
        raise
    except Exception as e:  # not a zip, truncated, object arrays...
        raise UsageError(f"{src}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if layout is not None and layout not in ("NCHW", "NHWC"):
        raise UsageError(f"{src}: 'layout' is {layout!r}; expected 'NCHW' or 'NHWC'")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if layout is None:
            layout = _guess_layout(x.shape, src)
        c = x.shape[1] if layout == "NCHW" else x.shape[3]
        if c not in (1, 3):
            raise UsageError(f"{src}: 'x' of shape {x.shape} as {layout} has {c} channels; expected 1 or 3")
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
    else:
        raise UsageError(f"{src}: 'x' must be (N, H, W), (N, C, H, W) or (N, H, W, C); got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"{src}: 'x' has {x.shape[0]} samples but 'y' has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise UsageError(f"{src}: no samples")
    if x.dtype == np.uint8:
        xt = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
    elif np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise UsageError(f"{src}: 'x' has dtype {x.dtype}; expected numbers")
    if not torch.isfinite(xt).all():
        raise UsageError(f"{src}: 'x' contains NaN or infinite values")
    if x.dtype != np.uint8 and (float(xt.min()) < 0.0 or float(xt.max()) > 1.0):
        # uint8 images are scaled to [0, 1]; other dtypes are taken as they are. Torchvision weights
        # expect [0, 1] before their ImageNet normalisation, so say so rather than train on a wrong scale.
        _log.warning("%s: 'x' (%s) has values in [%.3g, %.3g], not [0, 1]: float images are used as given "
                     "(uint8 is divided by 255); pretrained torchvision weights expect [0, 1]",
                     src, x.dtype, float(xt.min()), float(xt.max()))
    labels, classes = _labels(y, src)
    return ArrayImages(xt, labels, classes, src)


def _load_folder(path: Path) -> FolderImages:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels, used = [], [], []
    for c in classes:
        imgs = sorted(str(p) for p in (path / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if imgs:
            labels += [len(used)] * len(imgs)
            files += imgs
            used.append(c)
    if len(used) < 2:
        raise UsageError(f"{path}: an image folder needs at least 2 class sub-folders with images "
                         f"(PATH/<class>/<image>.png|jpg|...); found {len(used)} ({used})")
    _check_headers(files)
    return FolderImages(files, torch.tensor(labels, dtype=torch.int64), used, str(path))


def load_images(path: str | os.PathLike) -> Images:
    """An :class:`Images` data set from an ImageFolder directory or an ``.npz`` file (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _load_folder(p)
    if p.suffix.lower() == ".npz":
        return _load_npz(p)
    raise UsageError(f"data path {str(p)!r}: expected an ImageFolder directory or an .npz file with 'x' and 'y'")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded random train/val/test split of ``range(n)``: the same arguments give the same split."""
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise UsageError(f"{name} must be in (0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise UsageError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    if n_test < 1 or n_val < 1 or n - n_test - n_val < 1:
        raise UsageError(f"{n} samples are too few for a train/val/test split with val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return {"test": sorted(perm[:n_test]), "val": sorted(perm[n_test:n_test + n_val]),
            "train": sorted(perm[n_test + n_val:])}


def channel_stats(data: Images, indices: Sequence[int], limit: int = 2000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (up to ``limit``) samples ``indices`` at the configured size."""
    idx = list(indices)
    if len(idx) > limit:
        pick = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
        idx = [idx[i] for i in pick]
    total = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in idx:
        img = data.raw(i).double()
        total += img.sum(dim=(1, 2))
        sq += (img * img).sum(dim=(1, 2))
        count += img.shape[1] * img.shape[2]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.tolist(), std.tolist()


@dataclass
class Prepared:
    """A configured data set and its splits (indices into it)."""

    data: Images
    splits: dict[str, list[int]]
    input_size: int
    mean: list[float]
    std: list[float]

    def subset(self, split: str) -> Subset:
        return Subset(self.data, self.splits[split])


def prepare(data: Images, input_size: int, val_fraction: float, test_fraction: float, seed: int,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Prepared:
    """Split ``data`` and configure size and normalisation (``mean``/``std`` None: training-split statistics)."""
    splits = split_indices(len(data), val_fraction, test_fraction, seed)
    data.configure(input_size, [0.0] * 3, [1.0] * 3)
    if mean is None or std is None:
        mean, std = channel_stats(data, splits["train"], seed=seed)
    data.configure(input_size, mean, std)
    return Prepared(data, splits, int(input_size), [float(m) for m in mean], [float(s) for s in std])


def loader(dataset: Any, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A single-process DataLoader (deterministic order unless ``shuffle``, seeded)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)
