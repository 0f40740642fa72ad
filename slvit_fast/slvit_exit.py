"""``SLViTExit``: the single-layer vision transformer early exit as an ``nn.Module``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import backends
from .backends.cpu_backend import fast_forward as _cpu_fast_forward
from .config import SLViTConfig
from .exit_presets import get_preset
from .layers import EncoderLayer, MLPHead
from .validation import check_extra, check_feature_map


class SLViTExit(nn.Module):
    """Single-layer ViT exit: patches -> embedding -> one encoder layer -> flatten -> MLP head.

    Args:
        config: the exit's hyper-parameters.
        backend: ``"auto"`` (default; see :mod:`slvit_fast.backends`), ``"torch"``, ``"triton"``,
            ``"cuda"``, ``"cuda-emu"`` or ``"cpu"``.

    ``forward(x, extra=None)`` takes the (B, C, H, W) feature map (contiguous or channels_last) and,
    for audiovisual exits, ``extra`` tokens (B, E, extra_dim); it returns (B, num_outputs).
    """

    def __init__(self, config: SLViTConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, SLViTConfig):
            raise TypeError(f"config must be an SLViTConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backends.check_name(backend)
        c = config
        self.patch_embed = nn.Linear(c.patch_dim, c.embed_dim)
        self.pos_embed = nn.Parameter(torch.empty(c.num_patches, c.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if c.extra_tokens:
            self.extra_embed = nn.Linear(c.extra_dim, c.embed_dim)
        self.layers = nn.ModuleList(
            EncoderLayer(c.embed_dim, c.num_heads, c.key_dim, c.mlp_dim, c.ln_eps) for _ in range(c.num_layers)
        )
        self.head = MLPHead(c.num_tokens * c.embed_dim, c.head_hidden, c.num_outputs, c.activation, c.head_dropout)

    @classmethod
    def from_preset(cls, name: str, num_outputs: int | None = None, backend: str = "auto", **overrides: Any):
        """An exit with the paper's settings for ``name`` (see :func:`slvit_fast.list_presets`).

        ``overrides`` replace any :class:`SLViTConfig` field, e.g. ``mlp_residual=False``.
        """
        kwargs = get_preset(name).slvit_kwargs()
        if num_outputs is not None:
            kwargs["num_outputs"] = num_outputs
        kwargs.update(overrides)
        return cls(SLViTConfig(**kwargs), backend=backend)

    @classmethod
    def from_keras(cls, keras_model: Any, config: SLViTConfig | None = None, backend: str = "auto"):
        """Copy the weights of a Keras SL-ViT (as built by ``interop.keras.build_keras_slvit``)."""
        from .interop.keras import slvit_from_keras

        return slvit_from_keras(cls, keras_model, config, backend)

    def forward(self, x: Tensor, extra: Tensor | None = None) -> Tensor:
        # Batch-1 latency: the fused CPU entry point first, when backend resolution would pick it; it
        # checks x and extra against the config itself and returns None for anything the path below
        # must handle (other backends, autograd, dropout, dtypes, modes, bad inputs and their errors).
        out = _cpu_fast_forward(self, x, extra)
        if out is not None:
            return out
        c = self.config
        check_feature_map(x, c.in_channels, c.feature_size, "SLViTExit")
        check_extra(extra, x, c.extra_tokens, c.extra_dim, "SLViTExit")
        if x.dtype != self.patch_embed.weight.dtype:
            raise TypeError(
                f"SLViTExit: feature map dtype {x.dtype} differs from the exit's parameters "
                f"({self.patch_embed.weight.dtype}); convert one of them (e.g. exit.to(x.dtype))"
            )
        return backends.resolve(self.backend, x).slvit_exit(self, x, extra)

    def active_backend(self, x: Tensor) -> str:
        """Name of the backend ``forward`` would use for ``x``."""
        return backends.resolve(self.backend, x).name

    def extra_repr(self) -> str:
        c = self.config
        return (f"grid={c.grid}, patch={c.patch_size}, d={c.embed_dim}, heads={c.num_heads}x{c.key_dim}, "
                f"tokens={c.num_tokens}, outputs={c.num_outputs}, backend={self.backend!r}")
