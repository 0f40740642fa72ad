"""``CNNExit``: the paper's conventional baseline exit (conv -> ReLU -> max-pool -> flatten -> MLP head)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .config import CNNExitConfig
from .exit_presets import get_preset
from .layers import MLPHead
from .validation import check_feature_map


class CNNExit(nn.Module):
    """Conv 3x3 ('same') -> ReLU -> max-pool -> flatten -> MLP head; plain PyTorch on every device.

    With ``extra_dim > 0`` (audiovisual AV1 exit) an extra vector (B, extra_dim) - or (B, 1, extra_dim)
    - modulates the feature map first by FiLM, ``gamma(a) * x + beta(a)``, as AudioCSRNet's fusion
    blocks do (without dilation).
    """

    def __init__(self, config: CNNExitConfig):
        super().__init__()
        if not isinstance(config, CNNExitConfig):
            raise TypeError(f"config must be a CNNExitConfig, got {type(config).__name__}")
        self.config = config
        c = config
        if c.extra_dim:
            self.film_gamma = nn.Linear(c.extra_dim, c.in_channels)
            self.film_beta = nn.Linear(c.extra_dim, c.in_channels)
        self.conv = nn.Conv2d(c.in_channels, c.filters, c.kernel_size, padding=c.kernel_size // 2)
        self.head = MLPHead(c.flat_dim, c.head_hidden, c.num_outputs, c.activation, c.head_dropout)

    @classmethod
    def from_preset(cls, name: str, num_outputs: int | None = None, **overrides: Any) -> "CNNExit":
        kwargs = get_preset(name).cnn_kwargs()
        if num_outputs is not None:
            kwargs["num_outputs"] = num_outputs
        kwargs.update(overrides)
        return cls(CNNExitConfig(**kwargs))

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        c = self.config
        check_feature_map(x, c.in_channels, c.feature_size, "CNNExit")
        if c.extra_dim:
            if extra is None:
                raise ValueError(f"CNNExit: this exit fuses an extra vector of width {c.extra_dim}; pass extra=...")
            a = extra.reshape(extra.shape[0], -1)
            if a.shape != (x.shape[0], c.extra_dim):
                raise ValueError(f"CNNExit: extra must be (B, {c.extra_dim}) or (B, 1, {c.extra_dim}), "
                                 f"got {tuple(extra.shape)}")
            x = self.film_gamma(a)[:, :, None, None] * x + self.film_beta(a)[:, :, None, None]
        elif extra is not None:
            raise ValueError("CNNExit: got extra input but the config has extra_dim=0")
        y = F.max_pool2d(F.relu(self.conv(x)), c.pool_size)
        # Flatten channels-last (H, W, C) like Keras' Flatten, so imported head weights line up.
        return self.head(y.permute(0, 2, 3, 1).reshape(y.shape[0], -1))
