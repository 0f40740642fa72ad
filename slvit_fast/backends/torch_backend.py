"""The reference backend: plain PyTorch ops (eager), any device and dtype. Always available."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..ops.saved import saveable


class TorchBackend:
    name = "torch"

    def unavailable_reason(self, x: Tensor) -> str | None:
        return None

    def slvit_exit(self, module: torch.nn.Module, x: Tensor, extra: Tensor | None) -> Tensor:
        if extra is not None and torch.is_grad_enabled():
            # the projection of the extra tokens saves them as they are; features made under
            # inference_mode must train here as on the fused backends (ops/saved.py). The feature map
            # needs no copy: patch extraction copies it before anything is saved.
            (extra,) = saveable(extra)
        return reference.slvit_exit(x, reference.module_params(module), module.config, extra,
                                    training=module.training)


BACKEND = TorchBackend()
