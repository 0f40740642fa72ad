"""The reference backend: plain PyTorch ops (eager), any device and dtype. Always available."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, x: Tensor) -> str | None:
        return None

    def slvit_exit(self, module: torch.nn.Module, x: Tensor, extra: Tensor | None) -> Tensor:
        return reference.slvit_exit(x, reference.module_params(module), module.config, extra,
                                    training=module.training)


BACKEND = TorchBackend()
