"""Backbone presets: a torchvision (or AudioCSRNet) backbone with exits attached at its branch points.

(Users reach this module as :mod:`slvit_fast.presets`; the paper's per-branch exit settings are in
:mod:`slvit_fast.exit_presets`, the torchvision catalogue in :mod:`slvit_fast.backbones.torchvision_zoo`,
weight loading in :mod:`slvit_fast.backbones.weights`.)

``build(name, exit_type="slvit"|"cnn", num_outputs=..., weights=None, input_size=None, branches=None,
exit_paths=None)`` returns a :class:`~slvit_fast.MultiExitNetwork` in eval mode;
``build_backbone(name, num_outputs, weights, input_size)`` returns the backbone alone.

Branch points (module -> feature shape at 224 px; AudioCSRNet at 576x1024). The paper's backbones
(first block) get the paper's exits (Table III) at their default input size; every other backbone - and
a paper backbone at another input size - gets exits sized for the actual map by
``SLViTConfig.for_feature_map`` / ``CNNExitConfig.for_feature_map``:

==================  ======  ===============================  ===========  ==========================
backbone            branch  module                           shape (CHW)  note
==================  ======  ===============================  ===========  ==========================
resnet152           b1      ``layer2.0.conv2``               128x28x28    paper: 12th conv
resnet152           b2      ``layer2``                       512x28x28    paper: 36th conv
densenet201         b1      ``features.transition1``         128x28x28    paper: transition 1
densenet201         b2      ``features.transition2.conv``    256x28x28    paper: transition 2 (before pool)
inception_v3        b1      ``Mixed_5b``                     256x25x25    paper: first concat
inception_v3        b2      ``Mixed_5c``                     288x25x25    paper: second concat
audiocsrnet         v1      ``encoders.visual``              512x72x128   paper: last VGG-16 layer
audiocsrnet         av1     ``encoders.visual`` + audio      512x72x128   + 1 VGGish token (128-d)
audiocsrnet         av2     ``fusion.0.act``                 512x72x128   paper: first fusion block
resnet18, resnet34  b1, b2  ``layer1``, ``layer2``           64x56x56, 128x28x28
resnet50, resnet101 b1, b2  ``layer1``, ``layer2``           256x56x56, 512x28x28
densenet121         b1, b2  as densenet201                   128x28x28, 256x28x28
densenet169         b1, b2  as densenet201                   128x28x28, 256x28x28
mobilenet_v3_large  b1, b2  ``features.3``, ``features.6``   24x56x56, 40x28x28
efficientnet_b0     b1, b2  ``features.2``, ``features.3``   24x56x56, 40x28x28
convnext_tiny       b1, b2  ``features.1``, ``features.3``   96x56x56, 192x28x28
==================  ======  ===============================  ===========  ==========================

The rule for the added backbones: b1 ends the first stage at stride 4 (56x56 at 224 px), b2 the stage at
stride 8 (28x28) - early branches, where exits pay off (the paper's branches are all at 28x28 or 25x25).
``tests/test_presets_backbones.py`` checks every row.

Default input sizes: 224x224 (inception_v3 too: torchvision's Inception-v3 at 224 gives the paper's
25x25 maps; at its usual 299 the maps are 35x35), AudioCSRNet 576x1024 image + 96x64 log-Mel.
The exit ``layer2.0.conv2`` of ResNet152 sits inside a bottleneck block: its batch compaction happens at
the block output ``layer2.0`` (see :mod:`slvit_fast.multi_exit`). DenseNet's ``transition1`` ends with
its average pool (28x28x128 as in the paper); its ``transition2`` pool would give 14x14, so branch 2
reads the transition's conv (28x28x256, the paper's shape).

Weights (``weights=``): a ``state_dict`` (or a module), a file (``.pt``/``.pth`` through
``torch.load(weights_only=True)``, or ``.safetensors``), a torchvision weights name such as
``"IMAGENET1K_V2"``/``"DEFAULT"`` (downloaded into torchvision's cache; offline, the error names the
URL and how to pass the file instead), or the state of a whole ``MultiExitNetwork`` (keys
``backbone.*``/``exits.*``). A classifier whose size differs from ``num_outputs`` is replaced by a new
random one with a logged note (timm's ``num_classes`` behaviour); ``net.classifier_replaced`` says so.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .backbones import torchvision_zoo
from .backbones.weights import WeightsUnavailableError, load_into, read_weights
from .cnn_exit import CNNExit
from .config import CNNExitConfig, SLViTConfig, patch_for_map
from .exit_presets import get_preset
from .multi_exit import MultiExitNetwork
from .shape_probe import input_sizes, probe
from .slvit_exit import SLViTExit

__all__ = ["build", "build_backbone", "list_backbones", "canonical_name", "BRANCHES", "DEFAULT_INPUT", "Branch",
           "example_input", "patch_for", "exit_config", "WeightsUnavailableError", "PAPER_BACKBONES"]


@dataclass(frozen=True)
class Branch:
    name: str                 # "b1", "v1", ...
    exit_preset: str | None   # key of slvit_fast.exit_presets.PRESETS (paper backbones), else None
    module: str               # backbone module path whose output feeds the exit
    extra: str | None = None  # module whose output is the extra (audio) input


# The paper's backbones: their exits are the paper's presets (Table III) at the default input size.
_PAPER: dict[str, list[Branch]] = {
    "resnet152": [Branch("b1", "resnet152-b1", "layer2.0.conv2"), Branch("b2", "resnet152-b2", "layer2")],
    "densenet201": [Branch("b1", "densenet201-b1", "features.transition1"),
                    Branch("b2", "densenet201-b2", "features.transition2.conv")],
    "inception_v3": [Branch("b1", "inceptionv3-b1", "Mixed_5b"), Branch("b2", "inceptionv3-b2", "Mixed_5c")],
    "audiocsrnet": [Branch("v1", "audiocsrnet-v1", "encoders.visual"),
                    Branch("av1", "audiocsrnet-av1", "encoders.visual", extra="encoders.audio"),
                    Branch("av2", "audiocsrnet-av2", "fusion.0.act")],
}
PAPER_BACKBONES = tuple(_PAPER)

BRANCHES: dict[str, list[Branch]] = {
    **_PAPER,
    **{name: [Branch(b, None, m) for b, m in spec.branches]
       for name, spec in torchvision_zoo.SPECS.items() if name not in _PAPER},
}

DEFAULT_INPUT: dict[str, Any] = {
    **{name: (3, 224, 224) for name in BRANCHES if name != "audiocsrnet"},
    "audiocsrnet": ((3, 576, 1024), (1, 96, 64)),
}

_ALIASES = {"inceptionv3": "inception_v3", "mobilenetv3_large": "mobilenet_v3_large",
            "mobilenet_v3": "mobilenet_v3_large", "efficientnetb0": "efficientnet_b0", "convnexttiny": "convnext_tiny"}


def list_backbones() -> list[str]:
    return list(BRANCHES)


def canonical_name(name: str) -> str:
    """``name`` as a preset key ('ResNet-18' -> 'resnet18'); a ValueError with suggestions if unknown."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in BRANCHES and key.replace("_", "") in {k.replace("_", "") for k in BRANCHES}:
        key = next(k for k in BRANCHES if k.replace("_", "") == key.replace("_", ""))
    if key not in BRANCHES:
        close = difflib.get_close_matches(key, list(BRANCHES), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown backbone preset {name!r}{hint} (valid: {', '.join(BRANCHES)})")
    return key


def _torchvision_builder(name: str) -> str | None:
    spec = torchvision_zoo.SPECS.get(name)
    return spec.builder if spec else None


def _make_backbone(name: str, num_outputs: int, input_size: Any, pretrained_input: bool = False) -> nn.Module:
    if name == "audiocsrnet":
        from .backbones.audiocsrnet import AudioCSRNet

        if num_outputs != 1:
            raise ValueError(f"audiocsrnet is a regression backbone (crowd count): num_outputs must be 1, got {num_outputs}")
        return AudioCSRNet(image_size=tuple(input_size[0][1:]))
    return torchvision_zoo.make(name, num_outputs, pretrained_input=pretrained_input)


def example_input(name: str, batch_size: int = 1, input_size: Any = None, generator=None) -> Any:
    """A random input batch for backbone ``name`` (a tensor, or a tuple for audiocsrnet)."""
    name = canonical_name(name)
    size = _input_size(name, input_size)
    if name == "audiocsrnet":
        return tuple(torch.randn(batch_size, *s, generator=generator) for s in size)
    return torch.randn(batch_size, *size, generator=generator)


def _input_size(name: str, input_size: Any) -> Any:
    if input_size is None:
        return DEFAULT_INPUT[name]
    if name == "audiocsrnet":
        if isinstance(input_size, int):  # the image side only
            return ((3, input_size, input_size), DEFAULT_INPUT[name][1])
        if isinstance(input_size[0], int):  # (H, W) of the image only
            return ((3, *input_size[-2:]), DEFAULT_INPUT[name][1])
        return tuple(tuple(s) for s in input_size)
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    return (3, *tuple(input_size)[-2:])


def patch_for(feature_size: tuple[int, int]) -> int:
    """The paper's patch rule (:func:`slvit_fast.config.patch_for_map`): the common divisor of H and W
    closest to sqrt(sqrt(H * W)) - 28 -> 4, 25 -> 5, 72x128 -> 8."""
    return patch_for_map(feature_size)


def exit_config(exit_type: str, in_channels: int, feature_size: tuple[int, int], num_outputs: int,
                overrides: Mapping[str, Any] | None = None) -> SLViTConfig | CNNExitConfig:
    """The exit config for a map of ``in_channels`` x ``feature_size``: ``<Config>.for_feature_map``."""
    cls = SLViTConfig if exit_type == "slvit" else CNNExitConfig
    return cls.for_feature_map(in_channels, tuple(feature_size), num_outputs, **dict(overrides or {}))


def _paper_exit(branch: Branch, exit_type: str, shape: tuple[int, ...], num_outputs: int,
                overrides: dict | None) -> SLViTConfig | CNNExitConfig:
    """A paper backbone's exit: the paper preset at the paper's map; elsewhere the preset adapted to it."""
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
        return SLViTConfig(**kw)
    kw = preset.cnn_kwargs()
    kw["num_outputs"] = num_outputs
    if (C, H, W) != paper:
        pool = max(1, min(preset.cnn_pool, H, W))
        kw.update(in_channels=C, feature_size=(H, W), pool_size=(pool, pool))
    kw.update(overrides or {})
    return CNNExitConfig(**kw)


def _module_for(config: SLViTConfig | CNNExitConfig, backend: str) -> nn.Module:
    return SLViTExit(config, backend=backend) if isinstance(config, SLViTConfig) else CNNExit(config)


def build_backbone(name: str, num_outputs: int | None = None, weights: Any = None, input_size: Any = None,
                   ) -> tuple[nn.Module, list[str]]:
    """The backbone ``name`` alone (train mode as built), with ``weights`` loaded: ``(module, notes)``.

    ``notes`` lists what loading changed (a replaced classifier, ignored auxiliary weights). A whole
    ``MultiExitNetwork`` state (``backbone.*`` keys) is reduced to its backbone part here.
    """
    name = canonical_name(name)
    if num_outputs is None:
        num_outputs = 1 if name == "audiocsrnet" else 10
    size = _input_size(name, input_size)
    if weights is None:
        return _make_backbone(name, num_outputs, size), []
    return _loaded_backbone(name, num_outputs, size, *read_weights(_torchvision_builder(name), weights))


def _loaded_backbone(name: str, num_outputs: int, size: Any, state: dict, source: str, from_tv: bool,
                     ) -> tuple[nn.Module, list[str]]:
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = _make_backbone(name, num_outputs, size, pretrained_input=from_tv)
    spec = torchvision_zoo.SPECS.get(name)
    notes = load_into(backbone, state, spec.classifier if spec else None, source, name,
                      drop_prefixes=("AuxLogits.",) if name == "inception_v3" else ())
    return backbone, notes


def build(
    name: str,
    exit_type: str = "slvit",
    num_outputs: int | None = None,
    weights: Any = None,
    input_size: Any = None,
    branches: Sequence[str] | None = None,
    freeze_backbone: bool = True,
    exit_backend: str = "auto",
    exit_overrides: dict[str, Any] | None = None,
    exit_paths: Sequence[str] | None = None,
) -> MultiExitNetwork:
    """Backbone ``name`` with exits at its branch points (or at ``exit_paths``), in eval mode.

    Args:
        name: one of :func:`list_backbones` (``resnet18`` ... ``convnext_tiny``, ``audiocsrnet``).
        exit_type: ``"slvit"`` or ``"cnn"`` (the paper's baseline exit).
        num_outputs: classes (default 10) or 1 for audiocsrnet (regression). A classifier in
            ``weights`` of another size is replaced (logged; ``net.classifier_replaced``).
        weights: ``None`` (random), a state_dict or module, a ``.pt``/``.pth``/``.safetensors`` file,
            a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``), or the state of a whole
            ``MultiExitNetwork`` (``backbone.*``/``exits.*``: exits are loaded too).
        input_size: (C, H, W) or (H, W) or an int (square); for audiocsrnet ``(H, W)`` of the image or
            ``((3, H, W), (1, frames, 64))``. Exit configs are built for the feature shapes this gives.
        branches: subset of the branch names (default: every branch of the backbone).
        exit_paths: module paths to attach exits to instead of the preset branches (sized with
            ``for_feature_map``); the branch names are then the paths.
        exit_backend: ``backend=`` of the SL-ViT exits (see :mod:`slvit_fast.backends`).
        exit_overrides: config fields replaced in every exit, e.g. the paper's CIFAR-100 Inception
            setting ``{"embed_dim": 36, "num_heads": 8}`` or ``{"mlp_residual": False}`` (Table VII).
    """
    name = canonical_name(name)
    if exit_type not in ("slvit", "cnn"):
        raise ValueError(f"exit_type must be 'slvit' or 'cnn', got {exit_type!r}")
    if num_outputs is None:
        num_outputs = 1 if name == "audiocsrnet" else 10
    size = _input_size(name, input_size)
    chosen = BRANCHES[name]
    if exit_paths is not None and branches is not None:
        raise ValueError("pass branches= (preset branch names) or exit_paths= (module paths), not both")
    if exit_paths is not None:
        exit_paths = [str(p).strip() for p in exit_paths if str(p).strip()]
        if not exit_paths:
            raise ValueError("exit_paths is empty")
        chosen = [Branch(p, None, p) for p in exit_paths]
    elif branches is not None:
        valid = [b.name for b in chosen]
        unknown = [b for b in branches if b not in valid]
        if unknown:
            raise ValueError(f"unknown branch(es) {unknown} for {name}; valid: {valid}")
        chosen = [b for b in chosen if b.name in branches]
    whole_net_state, notes = None, []
    if weights is None:
        backbone = _make_backbone(name, num_outputs, size)
    else:
        state, source, from_tv = read_weights(_torchvision_builder(name), weights)
        if any(k.startswith("backbone.") for k in state) and any(k.startswith("exits.") for k in state):
            whole_net_state = state  # a saved MultiExitNetwork: its exits are loaded after building them
        backbone, notes = _loaded_backbone(name, num_outputs, size, state, source, from_tv)
    modules = dict(backbone.named_modules())
    missing = [b.module for b in chosen if b.module not in modules]
    if missing:
        close = {m: difflib.get_close_matches(m, list(modules), n=2) for m in missing}
        raise ValueError(f"{name} has no module(s) {missing} to attach exits to (close: {close}); "
                         f"module paths are those of backbone.named_modules()")
    shapes = probe(backbone, [(1, *s) for s in input_sizes(size)], [b.module for b in chosen])
    exits, key_branch = {}, {}
    for b in chosen:
        key = b.module if b.module not in exits else f"{b.module}#{b.name}"
        shape = shapes[b.module]
        if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(s, int) for s in shape)):
            raise ValueError(f"exit at {b.module!r}: expected a (B, C, H, W) feature map, the module gives {shape}")
        if b.exit_preset is not None:
            config = _paper_exit(b, exit_type, shape, num_outputs, exit_overrides)
        else:
            config = exit_config(exit_type, shape[1], shape[2:], num_outputs, exit_overrides)
        module = _module_for(config, exit_backend)
        exits[key] = (module, b.extra) if b.extra else module
        key_branch[key] = b.name
    net = MultiExitNetwork(backbone, exits, freeze_backbone=freeze_backbone)
    net.preset_name = name
    net.branch_names = [key_branch[p] for p in net.exit_paths]
    net.input_size = size
    net.weights_notes = notes
    net.classifier_replaced = any("classifier" in n and "replaced" in n for n in notes)
    if whole_net_state is not None:
        net.load_state_dict(whole_net_state)
    return net.eval()
