"""Copycat fine-tuning (CC-SL-ViT, paper §III-C).

Images of another domain are labelled by the trained network's *final* output (a "fake" set), mixed
with the real training set at a fake:real ratio (paper: 2:1) and used to fine-tune trained exits.
:class:`CopycatMix` draws exactly ``round(ratio * len(real))`` fake samples every epoch (without
replacement while the fake set lasts), plus every real sample once, shuffled together.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .feature_cache import as_inputs


@torch.no_grad()
def label_with_network(net: torch.nn.Module, unlabeled, batch_size: int = 64, regression: bool | None = None,
                       input_index: int | None = 0) -> Dataset:
    """The fake set: each unlabeled input with the network's final prediction as its label.

    ``unlabeled``: a Dataset or DataLoader. When it yields tuples (``TensorDataset``, ``(image, label)``
    datasets) the inputs are element ``input_index`` of each; ``input_index=None`` takes the whole tuple
    as the backbone's inputs (multi-input backbones). Any labels it carries are ignored.
    """
    loader = unlabeled if isinstance(unlabeled, DataLoader) else DataLoader(unlabeled, batch_size=batch_size)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    xs: list[list[torch.Tensor]] = []
    ys = []
    for batch in loader:
        x = batch[input_index] if isinstance(batch, (tuple, list)) and input_index is not None else batch
        inputs = tuple(t.to(device) for t in as_inputs(x))
        final = net.backbone(*inputs)
        is_regression = final.shape[-1] == 1 if regression is None else regression
        ys.append((final.reshape(-1) if is_regression else final.argmax(-1)).cpu())
        xs.append([t.cpu() for t in inputs])
    net.train(was_training)
    columns = [torch.cat([b[j] for b in xs]) for j in range(len(xs[0]))]
    return _FakeSet(columns, torch.cat(ys))


class _FakeSet(Dataset):
    def __init__(self, columns: list[torch.Tensor], labels: torch.Tensor):
        self.columns, self.labels = columns, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.columns[0][i] if len(self.columns) == 1 else tuple(c[i] for c in self.columns)
        return x, self.labels[i]


class CopycatMix(Dataset):
    """Real samples at indices ``[0, len(real))``, fake ones after; pair with :class:`CopycatSampler`."""

    def __init__(self, real: Dataset, fake: Dataset, ratio: float = 2.0):
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"fake:real ratio must be a finite number >= 0, got {ratio}")
        if len(real) == 0:
            raise ValueError("the real dataset is empty")
        if ratio > 0 and len(fake) == 0:
            raise ValueError("the fake dataset is empty but ratio > 0")
        self.real, self.fake, self.ratio = real, fake, ratio

    @property
    def fake_per_epoch(self) -> int:
        return round(self.ratio * len(self.real))

    def __len__(self) -> int:
        return len(self.real) + len(self.fake)

    def __getitem__(self, i: int):
        return self.real[i] if i < len(self.real) else self.fake[i - len(self.real)]

    def is_fake(self, i: int) -> bool:
        return i >= len(self.real)


class CopycatSampler(Sampler[int]):
    """Every real index once + exactly ``fake_per_epoch`` fake indices, shuffled; new draw each epoch."""

    order_follows_epoch = True  # its order is a function of (seed, epoch): a checkpoint saves the epoch only

    def __init__(self, mix: CopycatMix, seed: int = 0):
        self.mix, self.seed, self.epoch = mix, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mix.real) + self.mix.fake_per_epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # a fresh draw each pass even if nobody calls set_epoch
        n_real, n_fake, want = len(self.mix.real), len(self.mix.fake), self.mix.fake_per_epoch
        chunks, left = [], want
        while left > 0:  # without replacement while the fake set lasts, then start a new permutation
            take = min(left, n_fake)
            chunks.append(torch.randperm(n_fake, generator=g)[:take] + n_real)
            left -= take
        idx = torch.cat([torch.arange(n_real), *chunks]) if chunks else torch.arange(n_real)
        return iter(idx[torch.randperm(len(idx), generator=g)].tolist())


def copycat_loader(real: Dataset, fake: Dataset, ratio: float = 2.0, batch_size: int = 64, seed: int = 0,
                   **loader_kwargs: Any) -> DataLoader:
    """A DataLoader over the real+fake mix honouring ``ratio`` exactly per epoch."""
    mix = CopycatMix(real, fake, ratio)
    return DataLoader(mix, batch_size=batch_size, sampler=CopycatSampler(mix, seed), **loader_kwargs)


def copycat_finetune(net: torch.nn.Module, real: Dataset, unlabeled, ratio: float = 2.0, batch_size: int = 64,
                     val_loader=None, seed: int = 0, **train_kwargs: Any):
    """Label ``unlabeled`` with the network, mix with ``real`` at ``ratio``:1, fine-tune the exits."""
    from .loop import train_exits

    fake = label_with_network(net, unlabeled, batch_size)
    loader = copycat_loader(real, fake, ratio, batch_size, seed)
    return train_exits(net, loader, val_loader, seed=seed, **train_kwargs)


__all__ = ["label_with_network", "CopycatMix", "CopycatSampler", "copycat_loader", "copycat_finetune"]
