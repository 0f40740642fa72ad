"""``attach_exits``: exits sized for your backbone's feature maps, attached in one call.

    net = sf.attach_exits(torchvision.models.resnet18(), ["layer1", "layer2"], num_outputs=10,
                          input_size=(3, 224, 224))

The feature shapes come from :func:`slvit_fast.feature_shapes` (fake tensors, nothing computed), each
exit's config from ``SLViTConfig.for_feature_map`` / ``CNNExitConfig.for_feature_map`` (the paper's
design; the SL-ViT exit never has more parameters or FLOPs than the CNN exit on the same map).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from .cnn_exit import CNNExit
from .config import CNNExitConfig, SLViTConfig
from .multi_exit import MultiExitNetwork
from .shape_probe import image_sizes, feature_shapes
from .slvit_exit import SLViTExit

__all__ = ["attach_exits", "exit_for_feature_map"]

EXIT_TYPES = ("slvit", "cnn")


def exit_for_feature_map(exit_type: str, shape: Sequence[int], num_outputs: int, backend: str = "auto",
                         **overrides: Any) -> nn.Module:
    """An ``SLViTExit`` (``exit_type="slvit"``) or ``CNNExit`` (``"cnn"``) for a (C, H, W) feature map."""
    if exit_type not in EXIT_TYPES:
        raise ValueError(f"exit_type must be one of {EXIT_TYPES}, got {exit_type!r}")
    C, H, W = shape
    if exit_type == "slvit":
        return SLViTExit(SLViTConfig.for_feature_map(C, (H, W), num_outputs, **overrides), backend=backend)
    return CNNExit(CNNExitConfig.for_feature_map(C, (H, W), num_outputs, **overrides))


def attach_exits(
    backbone: nn.Module,
    paths: Sequence[str] | str,
    num_outputs: int,
    input_size: Any,
    exit_type: str = "slvit",
    *,
    exit_backend: str = "auto",
    exit_overrides: Mapping[str, Any] | None = None,
    freeze_backbone: bool = True,
    **network_options: Any,
) -> MultiExitNetwork:
    """A ready :class:`MultiExitNetwork`: one new exit per module path, sized for its feature map.

    Args:
        backbone: any ``nn.Module`` (left unmodified; frozen by default).
        paths: module paths whose outputs feed the exits (see ``feature_shapes(backbone, input_size)``
            for the candidates and their shapes).
        num_outputs: classes (or regression outputs) of every exit.
        input_size: one sample's ``(C, H, W)`` (an int or ``(H, W)``: 3 channels), or a list of sizes for
            a backbone taking several inputs. Exits are built for the feature shapes at this size.
        exit_type: ``"slvit"`` (default) or ``"cnn"`` (the paper's baseline exit).
        exit_backend: ``backend=`` of the SL-ViT exits; ``exit_overrides``: config fields replaced in
            every exit (e.g. ``{"mlp_residual": False}``).
        network_options: passed to ``MultiExitNetwork`` (``compact_at=``, ``backbone_is_chain=``, ...).

    The network is returned in eval mode; ``net.input_size`` holds the size, so
    ``accounting.summary(net)`` needs no argument.
    """
    if exit_type not in EXIT_TYPES:
        raise ValueError(f"exit_type must be one of {EXIT_TYPES}, got {exit_type!r}")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("attach_exits: give at least one module path")
    shapes = feature_shapes(backbone, input_size, paths)
    exits = {p: exit_for_feature_map(exit_type, shapes[p], num_outputs, exit_backend, **dict(exit_overrides or {}))
             for p in paths}
    net = MultiExitNetwork(backbone, exits, freeze_backbone=freeze_backbone, **network_options)
    sizes = image_sizes(input_size)
    net.input_size = sizes[0] if len(sizes) == 1 else sizes
    return net.eval()
