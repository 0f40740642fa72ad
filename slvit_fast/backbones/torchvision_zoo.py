"""The torchvision backbones the presets know: how to build each, where its classifier is, where exits go.

Branch points follow the paper's rule (seeds/000 Table II: exits early in the network, where the
speedup is large) applied to every family the same way: **b1 = the end of the first stage at stride
4 (56x56 at 224 px), b2 = the end of the stage at stride 8 (28x28 at 224 px)**. The paper's own three
backbones keep the paper's exact branch modules (ResNet152 ``layer2.0.conv2``/``layer2``, DenseNet201
``transition1``/``transition2.conv``, Inception-v3 ``Mixed_5b``/``Mixed_5c``; see
:mod:`slvit_fast.backbone_presets`); the other DenseNets use DenseNet201's modules.

Every branch module is a direct child of the backbone or of a child ``nn.Sequential`` whose
``forward`` is a plain chain, so early exit compacts the batch right at the branch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

__all__ = ["TorchvisionSpec", "SPECS", "make"]


@dataclass(frozen=True)
class TorchvisionSpec:
    builder: str                              # torchvision.models.<builder>
    classifier: str                           # module path of the final nn.Linear (replaced on a class-count change)
    branches: tuple[tuple[str, str], ...]     # (branch name, module path)


def _resnet(name: str) -> TorchvisionSpec:
    return TorchvisionSpec(name, "fc", (("b1", "layer1"), ("b2", "layer2")))


def _densenet(name: str) -> TorchvisionSpec:
    # transition2's average pool would halve the map to 14x14; the paper reads the transition's conv
    return TorchvisionSpec(name, "classifier", (("b1", "features.transition1"), ("b2", "features.transition2.conv")))


SPECS: dict[str, TorchvisionSpec] = {
    **{n: _resnet(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101")},
    "resnet152": TorchvisionSpec("resnet152", "fc", (("b1", "layer2.0.conv2"), ("b2", "layer2"))),
    **{n: _densenet(n) for n in ("densenet121", "densenet169", "densenet201")},
    "inception_v3": TorchvisionSpec("inception_v3", "fc", (("b1", "Mixed_5b"), ("b2", "Mixed_5c"))),
    # features.3: last 24-channel block (56x56); features.6: last 40-channel block (28x28)
    "mobilenet_v3_large": TorchvisionSpec("mobilenet_v3_large", "classifier.3",
                                          (("b1", "features.3"), ("b2", "features.6"))),
    # features.2: stage of 24 channels (56x56); features.3: 40 channels (28x28)
    "efficientnet_b0": TorchvisionSpec("efficientnet_b0", "classifier.1", (("b1", "features.2"), ("b2", "features.3"))),
    # features.1: stage 1 (96 ch, 56x56); features.3: stage 2 (192 ch, 28x28); .0/.2 are stem/downsampling
    "convnext_tiny": TorchvisionSpec("convnext_tiny", "classifier.2", (("b1", "features.1"), ("b2", "features.3"))),
}


def make(name: str, num_outputs: int, pretrained_input: bool = False) -> nn.Module:
    """A random-weight torchvision backbone ``name`` with a ``num_outputs``-way classifier.

    ``pretrained_input``: Inception-v3 only - torchvision's ImageNet weights expect
    ``transform_input=True`` (ImageNet-normalised input re-normalised to [-1, 1] inside the model).
    """
    import torchvision

    spec = SPECS[name]
    builder = getattr(torchvision.models, spec.builder)
    if name == "inception_v3":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init_weights FutureWarning
            return builder(weights=None, aux_logits=False, init_weights=True, num_classes=num_outputs,
                           transform_input=pretrained_input)
    return builder(weights=None, num_classes=num_outputs)
