"""The paper's exit settings (SL-ViT paper Table III) at the branch points of Table II.

Feature shapes are those of the Keras backbones at 224x224 input (1024x576 for AudioCSRNet, whose
16x9 patch grid is 16 wide and 9 tall, i.e. a 72x128 (H x W) map cut into 8x8 patches).

The paper does not publish the hidden sizes. These presets use encoder MLP hidden 1024, head hidden
268 and 15 CNN filters: a least-squares fit of every published branch parameter count (Tables IV-VIII
and X); every published SL-ViT and CNN row is then reproduced within 5% (tests/test_param_counts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import PAPER_CNN_FILTERS as CNN_FILTERS, PAPER_HEAD_HIDDEN as HEAD_HIDDEN, PAPER_MLP_DIM as MLP_DIM

AUDIO_EMBED_DIM = 128  # VGGish embedding width: the AV1 exit appends one such audio token


@dataclass(frozen=True)
class ExitPreset:
    backbone: str
    branch: str
    in_channels: int
    feature_size: tuple[int, int]
    patch_size: int
    embed_dim: int = 32
    num_heads: int = 12
    num_outputs: int = 10
    cnn_pool: int = 2
    extra_tokens: int = 0
    note: str = ""

    def slvit_kwargs(self) -> dict[str, Any]:
        return dict(
            in_channels=self.in_channels, feature_size=self.feature_size,
            patch_size=(self.patch_size, self.patch_size), embed_dim=self.embed_dim,
            num_heads=self.num_heads, mlp_dim=MLP_DIM, head_hidden=HEAD_HIDDEN,
            num_outputs=self.num_outputs, extra_tokens=self.extra_tokens,
            extra_dim=AUDIO_EMBED_DIM if self.extra_tokens else 0,
        )

    def cnn_kwargs(self) -> dict[str, Any]:
        return dict(
            in_channels=self.in_channels, feature_size=self.feature_size, filters=CNN_FILTERS,
            pool_size=(self.cnn_pool, self.cnn_pool), head_hidden=HEAD_HIDDEN,
            num_outputs=self.num_outputs, extra_dim=AUDIO_EMBED_DIM if self.extra_tokens else 0,
        )


_AV = dict(backbone="audiocsrnet", feature_size=(72, 128), patch_size=8, num_outputs=1, cnn_pool=4)

PRESETS: dict[str, ExitPreset] = {
    p.backbone + "-" + p.branch: p
    for p in [
        ExitPreset("resnet152", "b1", 128, (28, 28), 4, note="after the 12th convolution"),
        ExitPreset("resnet152", "b2", 512, (28, 28), 4, note="after the 36th convolution"),
        ExitPreset("resnet152", "b2-h24", 512, (28, 28), 4, num_heads=24,
                   note="Speech Commands / GTZAN setting of branch 2 (24 heads)"),
        ExitPreset("densenet201", "b1", 128, (28, 28), 4, note="after transition layer 1"),
        ExitPreset("densenet201", "b2", 256, (28, 28), 4, note="after transition layer 2"),
        ExitPreset("inceptionv3", "b1", 256, (25, 25), 5, note="after the first filter concat"),
        ExitPreset("inceptionv3", "b2", 288, (25, 25), 5, note="after the second filter concat"),
        ExitPreset("inceptionv3", "b1-cifar100", 256, (25, 25), 5, embed_dim=36, num_heads=8,
                   num_outputs=100, note="CIFAR-100 setting (d=36, h=8)"),
        ExitPreset("inceptionv3", "b2-cifar100", 288, (25, 25), 5, embed_dim=36, num_heads=8,
                   num_outputs=100, note="CIFAR-100 setting (d=36, h=8)"),
        ExitPreset(branch="v1", in_channels=512, note="last VGG-16 layer (visual only)", **_AV),
        ExitPreset(branch="av1", in_channels=512, extra_tokens=1,
                   note="last VGG-16 layer + one VGGish audio token", **_AV),
        ExitPreset(branch="av2", in_channels=512, note="after the first fusion block", **_AV),
    ]
}


def list_presets() -> list[str]:
    """Names accepted by ``SLViTExit.from_preset`` and ``CNNExit.from_preset``."""
    return list(PRESETS)


def get_preset(name: str) -> ExitPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
