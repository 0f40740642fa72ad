"""``feature_shapes`` and ``attach_exits`` (issue #13 item 1): feature maps of any backbone without
computing anything, and exits sized for them in one call."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import slvit_fast as sf
from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit, accounting, policies as P
from slvit_fast.exit_presets import PRESETS


def meta(builder, **kw):
    """A torchvision model on the meta device: no memory, and any real arithmetic would fail."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return builder(weights=None, **kw)


# the paper's branch points (Table II) and their presets' maps (Table III)
PAPER_BRANCHES = [
    (torchvision.models.resnet152, {}, "layer2.0.conv2", "resnet152-b1"),
    (torchvision.models.resnet152, {}, "layer2", "resnet152-b2"),
    (torchvision.models.densenet201, {}, "features.transition1", "densenet201-b1"),
    (torchvision.models.densenet201, {}, "features.transition2.conv", "densenet201-b2"),
    (torchvision.models.inception_v3, {"aux_logits": False, "init_weights": False}, "Mixed_5b", "inceptionv3-b1"),
    (torchvision.models.inception_v3, {"aux_logits": False, "init_weights": False}, "Mixed_5c", "inceptionv3-b2"),
]


@pytest.mark.parametrize("builder, kw, path, preset", PAPER_BRANCHES, ids=[b[3] for b in PAPER_BRANCHES])
def test_paper_branch_maps_and_patches(builder, kw, path, preset):
    shapes = sf.feature_shapes(meta(builder, **kw), (3, 224, 224), [path])
    p = PRESETS[preset]
    assert shapes == {path: (p.in_channels, *p.feature_size)}
    C, H, W = shapes[path]
    assert SLViTConfig.for_feature_map(C, (H, W), 10).patch_size == (p.patch_size, p.patch_size)


def test_audiocsrnet_maps_and_patch():
    from slvit_fast.backbones import AudioCSRNet

    with torch.device("meta"):
        net = AudioCSRNet(image_size=(576, 1024))
    shapes = sf.feature_shapes(net, [(3, 576, 1024), (1, 96, 64)], ["encoders.visual", "fusion.0.act"])
    assert shapes == {"encoders.visual": (512, 72, 128), "fusion.0.act": (512, 72, 128)}
    assert SLViTConfig.for_feature_map(512, (72, 128), 1).patch_size == (8, 8)


def test_default_paths_are_the_chain_points_with_feature_maps():
    shapes = sf.feature_shapes(meta(torchvision.models.resnet18), 224)  # int: a 3-channel square image
    assert shapes["layer1"] == (64, 56, 56) and shapes["layer2"] == (128, 28, 28)
    assert shapes["layer3"] == (256, 14, 14) and shapes["layer4"] == (512, 7, 7)
    assert shapes["layer2.0"] == (128, 28, 28) and shapes["conv1"] == (64, 112, 112)
    assert "fc" not in shapes and "layer2.0.conv1" not in shapes  # not a 4-D map / inside a block
    order = list(shapes)
    assert order.index("layer1.1") < order.index("layer1") < order.index("layer2.0")  # forward order


def test_sizes_other_than_224_and_a_multi_exit_network():
    r = meta(torchvision.models.resnet18)
    assert sf.feature_shapes(r, (96, 128), ["layer3"]) == {"layer3": (256, 6, 8)}
    net = sf.attach_exits(torchvision.models.resnet18(num_classes=4), ["layer2"], 4, (3, 64, 64))
    assert sf.feature_shapes(net, (3, 64, 64), ["layer2"]) == {"layer2": (128, 8, 8)}


def test_clear_errors():
    r = meta(torchvision.models.resnet18)
    with pytest.raises(ValueError, match=r"'layer5' is not a submodule .* did you mean"):
        sf.feature_shapes(r, 224, ["layer5"])
    with pytest.raises(ValueError, match=r"'fc' outputs \(1, 1000\), not a \(B, C, H, W\) feature map"):
        sf.feature_shapes(r, 224, ["fc"])


def test_backbone_and_hooks_untouched():
    r = torchvision.models.resnet18()
    r.train()
    sf.feature_shapes(r, 64)
    assert all(m.training for m in r.modules())
    assert all(len(m._forward_hooks) == 0 for m in r.modules())


@pytest.mark.parametrize("exit_type, exit_class, config_class", [("slvit", SLViTExit, SLViTConfig),
                                                                  ("cnn", CNNExit, CNNExitConfig)])
def test_attach_exits_gives_a_ready_network(exit_type, exit_class, config_class):
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=5)
    net = sf.attach_exits(backbone, ["layer1", "layer2.1"], 5, (3, 64, 64), exit_type=exit_type,
                          exit_backend="torch") if exit_type == "slvit" else \
        sf.attach_exits(backbone, ["layer1", "layer2.1"], 5, (3, 64, 64), exit_type=exit_type)
    assert isinstance(net, sf.MultiExitNetwork) and net.exit_paths == ["layer1", "layer2.1"]
    assert not net.training and not any(p.requires_grad for p in net.backbone.parameters())
    for module, (C, H, W) in zip(net.exits.values(), [(64, 16, 16), (128, 8, 8)]):
        assert isinstance(module, exit_class)
        assert module.config == config_class.for_feature_map(C, (H, W), 5)
    x = torch.randn(3, 3, 64, 64)
    net.validate(x)
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(3, 5)] * 3
    r = net.early_exit(x, P.MaxSoftmax(0.0))
    assert r.counts == [3, 0, 0]
    rows = accounting.summary(net).rows  # input size remembered
    assert rows[0].feature_shape == (1, 64, 16, 16)


def test_attach_exits_slvit_not_larger_than_cnn():
    backbone = torchvision.models.resnet18(num_classes=10)
    a = sf.attach_exits(backbone, ["layer1", "layer2", "layer3", "layer4"], 10, 224, exit_backend="torch")
    b = sf.attach_exits(backbone, ["layer1", "layer2", "layer3", "layer4"], 10, 224, exit_type="cnn")
    for s, c in zip(accounting.summary(a).rows[:-1], accounting.summary(b).rows[:-1]):
        assert s.params <= c.params and s.exit_flops <= c.exit_flops


def test_attach_exits_errors():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ValueError, match="exit_type must be one of"):
        sf.attach_exits(backbone, ["0"], 2, (3, 8, 8), exit_type="mlp")
    with pytest.raises(ValueError, match="'1' outputs"):
        sf.attach_exits(backbone, ["1"], 2, (3, 8, 8))
