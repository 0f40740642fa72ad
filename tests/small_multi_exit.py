"""A small CNN backbone with two CNN exits and random labelled batches (policies, calibration tests)."""

from __future__ import annotations

import torch
from torch import nn

from slvit_fast import CNNExit, CNNExitConfig, MultiExitNetwork

K = 5


def tiny_net(seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K),
    )
    exits = {
        "1": CNNExit(CNNExitConfig(in_channels=8, feature_size=(16, 16), filters=4, head_hidden=16, num_outputs=K)),
        "4": CNNExit(CNNExitConfig(in_channels=16, feature_size=(8, 8), filters=4, head_hidden=16, num_outputs=K)),
    }
    return MultiExitNetwork(backbone, exits).eval()


def loader(n_batches: int = 4, batch: int = 25, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, K, (batch,), generator=g))
            for _ in range(n_batches)]
