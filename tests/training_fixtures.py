"""A tiny frozen backbone with two exits and a learnable synthetic task, for fast training tests."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit
from slvit_fast.multi_exit import MultiExitNetwork

NUM_CLASSES = 4


def tiny_backbone(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES),
    )


def tiny_net(seed: int = 0, freeze_backbone: bool = True, backend: str = "auto") -> MultiExitNetwork:
    backbone = tiny_backbone(seed)
    torch.manual_seed(seed + 1)
    slvit = SLViTExit(SLViTConfig(in_channels=8, feature_size=8, patch_size=2, embed_dim=16, num_heads=2, mlp_dim=32,
                                  head_hidden=32, num_outputs=NUM_CLASSES), backend=backend)
    cnn = CNNExit(CNNExitConfig(in_channels=8, feature_size=4, filters=4, head_hidden=16, num_outputs=NUM_CLASSES))
    return MultiExitNetwork(backbone, {"2": slvit, "5": cnn}, freeze_backbone=freeze_backbone)


def quadrant_task(n: int, seed: int = 0) -> TensorDataset:
    """Label = the brightest quadrant of channel 0: learnable by both exits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 2.0
    return TensorDataset(x, y)


def loader(ds, batch_size=16, shuffle=False):
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)
