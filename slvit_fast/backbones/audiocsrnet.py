"""AudioCSRNet (audiovisual crowd counting; SL-ViT paper §II-D, Fig. 4), built from torchvision parts.

* visual front end: the first 10 convolutions of torchvision's VGG-16 (``vgg16().features[:23]``, three
  max-pools: H/8 x W/8 x 512; 1024x576 input -> 128x72 maps);
* audio: a VGGish-style CNN on a 64-bin log-Mel spectrogram (1 x frames x 64; VGGish uses 96 frames of
  10 ms): its 6 conv layers (64, 128, 256, 256, 512, 512 filters, 3x3, max-pools after the 1st, 2nd,
  4th and 6th) as in VGGish, then global average pooling and a Linear to the 128-d embedding
  (VGGish's 4096-wide fully connected layers are replaced by the pooling to keep it small - a
  documented deviation);
* six fusion blocks (CSRNet's dilated back end 512, 512, 512, 256, 128, 64; dilation 2):
  ``v <- ReLU(gamma(a) * BN(D(v)) + beta(a))`` with gamma, beta = Linear(128 -> C) of the audio
  embedding, tiled over the map (paper eq. 3);
* a 1x1 conv to the density map, then the paper's regression output: a dense layer over the flattened
  density map initialised as a sum (weights 1, bias 0), so the initial output is the density's sum.

``forward(image, audio)``: image (B, 3, H, W), audio (B, 1, frames, 64) -> (B, 1) count.
The forward is a chain of the three children ``encoders -> fusion -> head`` passing ``(v, a)`` tuples,
so ``MultiExitNetwork`` can compact the batch at the end of ``encoders`` and of each fusion block.
Branch points (Table II): V1 ``encoders.visual``; AV1 ``encoders.visual`` + ``encoders.audio``;
AV2 ``fusion.0.act`` (output of the first fusion block).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

AUDIO_EMBED_DIM = 128
MEL_BINS = 64
BACKEND_CHANNELS = (512, 512, 512, 256, 128, 64)


def vgg16_frontend() -> nn.Sequential:
    """First 10 conv layers (with ReLUs and 3 max-pools) of torchvision's VGG-16, random weights."""
    from torchvision.models.vgg import cfgs, make_layers

    # torchvision's own VGG-16 ("D") feature builder, without the 100M-parameter classifier that
    # vgg16() would also allocate and initialise; VGG's init (Kaiming normal, fan_out) for the convs.
    layers = list(make_layers(cfgs["D"], batch_norm=False).children())[:23]
    for m in layers:
        if isinstance(m, nn.ReLU):
            m.inplace = False  # an exit hook may read a conv output that an in-place ReLU would overwrite
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class VGGishAudio(nn.Module):
    """VGGish-style audio CNN: (B, 1, frames, 64) log-Mel -> (B, 128) embedding."""

    def __init__(self, embed_dim: int = AUDIO_EMBED_DIM):
        super().__init__()
        cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]
        layers: list[nn.Module] = []
        c = 1
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c, embed_dim)

    def forward(self, mel: Tensor) -> Tensor:
        if mel.dim() == 3:
            mel = mel.unsqueeze(1)
        return self.embed(self.pool(self.features(mel)).flatten(1))


class AudioVisualEncoders(nn.Module):
    """``(image, audio) -> (v, a)``: the VGG-16 front end and the audio CNN."""

    def __init__(self):
        super().__init__()
        self.visual = vgg16_frontend()
        self.audio = VGGishAudio()

    def forward(self, image: Tensor, audio: Tensor) -> tuple[Tensor, Tensor]:
        return self.visual(image), self.audio(audio)


class FusionBlock(nn.Module):
    """``(v, a) -> (ReLU(gamma(a) * BN(D(v)) + beta(a)), a)``, D a 3x3 conv with dilation 2."""

    def __init__(self, in_channels: int, out_channels: int, audio_dim: int = AUDIO_EMBED_DIM, dilation: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.bn = nn.BatchNorm2d(out_channels)
        self.gamma = nn.Linear(audio_dim, out_channels)
        self.beta = nn.Linear(audio_dim, out_channels)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)  # identity modulation at initialisation
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)
        self.act = nn.ReLU()

    def forward(self, va: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        v, a = va
        y = self.bn(self.conv(v))
        y = self.gamma(a)[:, :, None, None] * y + self.beta(a)[:, :, None, None]
        return self.act(y), a


class CountHead(nn.Module):
    """1x1 conv to the density map, then a dense layer over it initialised as a sum -> (B, 1)."""

    def __init__(self, in_channels: int, map_size: tuple[int, int]):
        super().__init__()
        self.density = nn.Conv2d(in_channels, 1, 1)
        self.count = nn.Linear(map_size[0] * map_size[1], 1)
        nn.init.ones_(self.count.weight)
        nn.init.zeros_(self.count.bias)
        self.map_size = tuple(map_size)

    def forward(self, va: tuple[Tensor, Tensor]) -> Tensor:
        d = self.density(va[0])
        if tuple(d.shape[2:]) != self.map_size:
            raise ValueError(f"CountHead: density map is {tuple(d.shape[2:])}, built for {self.map_size}; "
                             "build AudioCSRNet with the image size you use")
        return self.count(d.flatten(1))


class AudioCSRNet(nn.Module):
    """Audiovisual crowd counting backbone (random weights). ``image_size`` is (H, W), divisible by 8."""

    def __init__(self, image_size: tuple[int, int] = (576, 1024)):
        super().__init__()
        H, W = image_size
        if H % 8 or W % 8:
            raise ValueError(f"AudioCSRNet: image size {image_size} must be divisible by 8")
        self.image_size = (H, W)
        self.encoders = AudioVisualEncoders()
        chans = (512,) + BACKEND_CHANNELS
        self.fusion = nn.Sequential(*(FusionBlock(chans[i], chans[i + 1]) for i in range(len(BACKEND_CHANNELS))))
        self.head = CountHead(BACKEND_CHANNELS[-1], (H // 8, W // 8))

    def forward(self, image: Tensor, audio: Tensor) -> Tensor:
        return self.head(self.fusion(self.encoders(image, audio)))


def example_inputs(batch_size: int, image_size: tuple[int, int] = (576, 1024), frames: int = 96,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Synthetic (image, log-Mel spectrogram) inputs of the right shapes."""
    image = torch.randn(batch_size, 3, *image_size, generator=generator)
    audio = torch.randn(batch_size, 1, frames, MEL_BINS, generator=generator)
    return image, audio
