"""Backbone presets: a random-weight backbone with the paper's exits (Table II) attached.

(Users reach this module as :mod:`slvit_fast.presets`; the exits' own settings are in
:mod:`slvit_fast.exit_presets`.)

``build(name, exit_type="slvit"|"cnn", num_outputs=..., weights=None, input_size=None, branches=None)``
returns a :class:`~slvit_fast.MultiExitNetwork` in eval mode.

Branch points (torchvision module -> feature shape at the default input size):

============  ======  =============================  ===========  ==========================
backbone      branch  module                         shape (CHW)  paper (Keras, Table II/III)
============  ======  =============================  ===========  ==========================
resnet152     b1      ``layer2.0.conv2``             128x28x28    12th conv, 28x28x128
resnet152     b2      ``layer2``                     512x28x28    36th conv, 28x28x512
densenet201   b1      ``features.transition1``       128x28x28    transition 1, 28x28x128
densenet201   b2      ``features.transition2.conv``  256x28x28    transition 2 (before pool)
inception_v3  b1      ``Mixed_5b``                   256x25x25    first concat, 25x25x256
inception_v3  b2      ``Mixed_5c``                   288x25x25    second concat, 25x25x288
audiocsrnet   v1      ``encoders.visual``            512x72x128   last VGG-16 layer
audiocsrnet   av1     ``encoders.visual`` + audio    512x72x128   + 1 VGGish token (128-d)
audiocsrnet   av2     ``fusion.0.act``               512x72x128   first fusion block
============  ======  =============================  ===========  ==========================

Default input sizes: 224x224 (inception_v3 too: torchvision's Inception-v3 at 224 gives the paper's
25x25 maps; at its usual 299 the maps are 35x35), AudioCSRNet 576x1024 image + 96x64 log-Mel.
The exit ``layer2.0.conv2`` of ResNet152 sits inside a bottleneck block: its batch compaction happens at
the block output ``layer2.0`` (see :mod:`slvit_fast.multi_exit`). DenseNet201's ``transition1`` ends
with its average pool (28x28x128 as in the paper); its ``transition2`` pool would give 14x14, so branch 2
reads the transition's conv (28x28x256, the paper's shape).

Where the actual feature shape differs from the paper's (another ``input_size``), the exit config is
built from the actual shape: same exit hyper-parameters, patch = the common divisor of H and W
closest to sqrt(sqrt(H*W)) (the paper's "patch about the square root of the map side" rule: 28->4,
25->5, 72x128->8), CNN pool size clipped to the map.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .cnn_exit import CNNExit
from .config import CNNExitConfig, SLViTConfig
from .exit_presets import get_preset
from .multi_exit import MultiExitNetwork
from .shape_probe import input_sizes, probe
from .slvit_exit import SLViTExit

__all__ = ["build", "list_backbones", "BRANCHES", "DEFAULT_INPUT", "Branch", "example_input", "patch_for"]


@dataclass(frozen=True)
class Branch:
    name: str             # "b1", "v1", ...
    exit_preset: str      # key of slvit_fast.exit_presets.PRESETS
    module: str           # torchvision / backbone module path whose output feeds the exit
    extra: str | None = None  # module whose output is the extra (audio) input


BRANCHES: dict[str, list[Branch]] = {
    "resnet152": [Branch("b1", "resnet152-b1", "layer2.0.conv2"), Branch("b2", "resnet152-b2", "layer2")],
    "densenet201": [Branch("b1", "densenet201-b1", "features.transition1"),
                    Branch("b2", "densenet201-b2", "features.transition2.conv")],
    "inception_v3": [Branch("b1", "inceptionv3-b1", "Mixed_5b"), Branch("b2", "inceptionv3-b2", "Mixed_5c")],
    "audiocsrnet": [Branch("v1", "audiocsrnet-v1", "encoders.visual"),
                    Branch("av1", "audiocsrnet-av1", "encoders.visual", extra="encoders.audio"),
                    Branch("av2", "audiocsrnet-av2", "fusion.0.act")],
}

DEFAULT_INPUT: dict[str, Any] = {
    "resnet152": (3, 224, 224),
    "densenet201": (3, 224, 224),
    "inception_v3": (3, 224, 224),
    "audiocsrnet": ((3, 576, 1024), (1, 96, 64)),
}


def list_backbones() -> list[str]:
    return list(BRANCHES)


def _backbone(name: str, num_outputs: int, input_size: Any) -> nn.Module:
    if name == "audiocsrnet":
        from .backbones.audiocsrnet import AudioCSRNet

        if num_outputs != 1:
            raise ValueError(f"audiocsrnet is a regression backbone (crowd count): num_outputs must be 1, got {num_outputs}")
        return AudioCSRNet(image_size=tuple(input_size[0][1:]))
    import torchvision

    if name == "inception_v3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True,
                                                   num_classes=num_outputs)
    return getattr(torchvision.models, name)(weights=None, num_classes=num_outputs)


def example_input(name: str, batch_size: int = 1, input_size: Any = None, generator=None) -> Any:
    """A random input batch for backbone ``name`` (a tensor, or a tuple for audiocsrnet)."""
    size = _input_size(name, input_size)
    if name == "audiocsrnet":
        return tuple(torch.randn(batch_size, *s, generator=generator) for s in size)
    return torch.randn(batch_size, *size, generator=generator)


def _input_size(name: str, input_size: Any) -> Any:
    if input_size is None:
        return DEFAULT_INPUT[name]
    if name == "audiocsrnet":
        if isinstance(input_size[0], int):  # (H, W) of the image only
            return ((3, *input_size[-2:]), DEFAULT_INPUT[name][1])
        return tuple(tuple(s) for s in input_size)
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    return (3, *tuple(input_size)[-2:])


def patch_for(feature_size: tuple[int, int]) -> int:
    """The paper's patch rule: the common divisor of H and W closest to sqrt(sqrt(H * W))."""
    H, W = feature_size
    target = math.sqrt(math.sqrt(H * W))
    divisors = [d for d in range(1, min(H, W) + 1) if H % d == 0 and W % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def _exit_for(branch: Branch, exit_type: str, shape: tuple[int, ...], num_outputs: int,
              backend: str = "auto", overrides: dict | None = None) -> nn.Module:
    preset = get_preset(branch.exit_preset)
    C, H, W = shape[1], shape[2], shape[3]
    paper = (preset.in_channels, *preset.feature_size)
    if exit_type == "slvit":
        kw = preset.slvit_kwargs()
        kw["num_outputs"] = num_outputs
        if (C, H, W) != paper:
            p = patch_for((H, W))
            kw.update(in_channels=C, feature_size=(H, W), patch_size=(p, p))
        kw.update(overrides or {})
        return SLViTExit(SLViTConfig(**kw), backend=backend)
    kw = preset.cnn_kwargs()
    kw["num_outputs"] = num_outputs
    if (C, H, W) != paper:
        pool = max(1, min(preset.cnn_pool, H, W))
        kw.update(in_channels=C, feature_size=(H, W), pool_size=(pool, pool))
    kw.update(overrides or {})
    return CNNExit(CNNExitConfig(**kw))


def build(
    name: str,
    exit_type: str = "slvit",
    num_outputs: int | None = None,
    weights: str | None = None,
    input_size: Any = None,
    branches: Sequence[str] | None = None,
    freeze_backbone: bool = True,
    exit_backend: str = "auto",
    exit_overrides: dict[str, Any] | None = None,
) -> MultiExitNetwork:
    """A random-weight backbone ``name`` with the paper's exits.

    Args:
        name: ``resnet152``, ``densenet201``, ``inception_v3`` or ``audiocsrnet``.
        exit_type: ``"slvit"`` or ``"cnn"`` (the paper's baseline exit).
        num_outputs: classes (default 10) or 1 for audiocsrnet (regression).
        weights: path of a ``state_dict`` for the backbone (or of a whole ``MultiExitNetwork``, keys
            ``backbone.*`` / ``exits.*``); nothing is downloaded.
        input_size: (C, H, W) or (H, W) or an int (square); for audiocsrnet ``(H, W)`` of the image or
            ``((3, H, W), (1, frames, 64))``. Exit configs are built for the feature shapes this gives.
        branches: subset of the branch names (default: all of Table II for the backbone).
        exit_backend: ``backend=`` of the SL-ViT exits (see :mod:`slvit_fast.backends`).
        exit_overrides: config fields replaced in every exit, e.g. the paper's CIFAR-100 Inception
            setting ``{"embed_dim": 36, "num_heads": 8}`` or ``{"mlp_residual": False}`` (Table VII).
    """
    name = name.lower().replace("-", "_")
    if name == "inceptionv3":
        name = "inception_v3"
    if name not in BRANCHES:
        raise ValueError(f"unknown backbone preset {name!r}; valid: {list(BRANCHES)}")
    if exit_type not in ("slvit", "cnn"):
        raise ValueError(f"exit_type must be 'slvit' or 'cnn', got {exit_type!r}")
    if num_outputs is None:
        num_outputs = 1 if name == "audiocsrnet" else 10
    size = _input_size(name, input_size)
    chosen = BRANCHES[name]
    if branches is not None:
        valid = [b.name for b in chosen]
        unknown = [b for b in branches if b not in valid]
        if unknown:
            raise ValueError(f"unknown branch(es) {unknown} for {name}; valid: {valid}")
        chosen = [b for b in chosen if b.name in branches]
    backbone = _backbone(name, num_outputs, size)
    state = None
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if not any(k.startswith("backbone.") for k in state):
            backbone.load_state_dict(state)
            state = None
    shapes = probe(backbone, [(1, *s) for s in input_sizes(size)], [b.module for b in chosen])
    exits, key_branch = {}, {}
    for b in chosen:
        key = b.module if b.module not in exits else f"{b.module}#{b.name}"
        module = _exit_for(b, exit_type, shapes[b.module], num_outputs, exit_backend, exit_overrides)
        exits[key] = (module, b.extra) if b.extra else module
        key_branch[key] = b.name
    net = MultiExitNetwork(backbone, exits, freeze_backbone=freeze_backbone)
    net.preset_name = name
    net.branch_names = [key_branch[p] for p in net.exit_paths]
    net.input_size = size
    if state is not None:
        net.load_state_dict(state)
    return net.eval()
