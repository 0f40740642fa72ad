"""Backbone presets (Table II branch points) and the AudioCSRNet backbone."""

from __future__ import annotations

import warnings

import pytest
import torch

from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit, presets
from slvit_fast.backbones import AudioCSRNet
from slvit_fast.exit_presets import get_preset

warnings.filterwarnings("ignore", category=RuntimeWarning)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.mark.parametrize("name", ["resnet152", "densenet201", "inception_v3", "audiocsrnet"])
def test_default_size_branches_have_the_papers_shapes(name):
    """At the default input sizes every branch's feature map is the paper's (Table III), so the exits are
    exactly the paper presets."""
    net = presets.build(name, exit_backend="torch")
    assert net.branch_names == [b.name for b in presets.BRANCHES[name]]
    example = presets.example_input(name, 1)
    shapes = net.feature_shapes(example)
    for branch, exit_module in zip(presets.BRANCHES[name], net.exits.values()):
        p = get_preset(branch.exit_preset)
        assert shapes[branch.module] == (1, p.in_channels, *p.feature_size), branch
        expected = SLViTExit.from_preset(branch.exit_preset, num_outputs=exit_module.config.num_outputs).config
        assert exit_module.config == expected
    if name == "audiocsrnet":
        assert shapes["encoders.audio"] == (1, 128)


def test_other_input_sizes_build_configs_from_actual_shapes():
    net = presets.build("inception_v3", exit_type="slvit", input_size=299, exit_backend="torch")
    cfgs = [e.config for e in net.exits.values()]
    assert [c.feature_size for c in cfgs] == [(35, 35), (35, 35)]
    assert [c.in_channels for c in cfgs] == [256, 288] and cfgs[0].patch_size == (5, 5)
    cnn = presets.build("resnet152", exit_type="cnn", input_size=(48, 64))
    assert [e.config.feature_size for e in cnn.exits.values()] == [(6, 8), (6, 8)]
    assert all(isinstance(e, CNNExit) for e in cnn.exits.values())
    assert presets.patch_for((28, 28)) == 4 and presets.patch_for((25, 25)) == 5
    assert presets.patch_for((72, 128)) == 8 and presets.patch_for((14, 14)) == 2


def test_exit_overrides():
    net = presets.build("resnet152", input_size=32, exit_overrides={"embed_dim": 36, "num_heads": 8,
                                                                      "mlp_residual": False})
    assert all((e.config.embed_dim, e.config.num_heads, e.config.mlp_residual) == (36, 8, False)
               for e in net.exits.values())


def test_build_errors():
    with pytest.raises(ValueError, match="unknown backbone preset.*resnet152"):
        presets.build("resnet5000")
    with pytest.raises(ValueError, match="unknown branch"):
        presets.build("resnet152", branches=["b3"], input_size=32)
    with pytest.raises(ValueError, match="exit_type"):
        presets.build("resnet152", exit_type="mlp")
    with pytest.raises(ValueError, match="regression"):
        presets.build("audiocsrnet", num_outputs=10, input_size=(32, 64))


def test_audiocsrnet_backbone():
    torch.manual_seed(0)
    model = AudioCSRNet(image_size=(32, 64)).eval()
    image, audio = presets.example_input("audiocsrnet", 3, (32, 64))
    with torch.no_grad():
        count = model(image, audio)
        v, a = model.encoders(image, audio)
        density = model.head.density(model.fusion((v, a))[0])
    assert count.shape == (3, 1) and v.shape == (3, 512, 4, 8) and a.shape == (3, 128)
    torch.testing.assert_close(count[:, 0], density.flatten(1).sum(1))  # dense layer initialised as a sum
    block = model.fusion[0]
    assert block.conv.dilation == (2, 2) and isinstance(block.bn, torch.nn.BatchNorm2d)
    # FiLM: gamma(a) * BN(D(v)) + beta(a), then ReLU
    with torch.no_grad():
        block.gamma.bias.fill_(2.0)
        block.beta.bias.fill_(-0.5)
        y, _ = block((v, a))
        ref = torch.relu(2.0 * block.bn(block.conv(v)) - 0.5)
    torch.testing.assert_close(y, ref)
    with pytest.raises(ValueError, match="divisible by 8"):
        AudioCSRNet(image_size=(30, 64))


def test_weights_argument_loads_a_state_dict(tmp_path):
    torch.manual_seed(0)
    net = presets.build("audiocsrnet", input_size=(32, 64), exit_backend="torch")
    path = tmp_path / "backbone.pt"
    torch.save(net.backbone.state_dict(), path)
    torch.manual_seed(1)
    again = presets.build("audiocsrnet", input_size=(32, 64), weights=str(path), exit_backend="torch")
    for (k, p), (_, q) in zip(net.backbone.state_dict().items(), again.backbone.state_dict().items()):
        assert torch.equal(p, q), k
    whole = tmp_path / "net.pt"
    torch.save(net.state_dict(), whole)
    third = presets.build("audiocsrnet", input_size=(32, 64), weights=str(whole), exit_backend="torch")
    for (k, p), (_, q) in zip(net.state_dict().items(), third.state_dict().items()):
        assert torch.equal(p, q), k


# -- the torchvision catalogue (#13 item 2) -----------------------------------------------------------
# The documented branch shapes at 224 px (backbone_presets docstring); the paper rows are checked above.
DOCUMENTED_SHAPES = {
    "resnet18": [(64, 56, 56), (128, 28, 28)], "resnet34": [(64, 56, 56), (128, 28, 28)],
    "resnet50": [(256, 56, 56), (512, 28, 28)], "resnet101": [(256, 56, 56), (512, 28, 28)],
    "resnet152": [(128, 28, 28), (512, 28, 28)],
    "densenet121": [(128, 28, 28), (256, 28, 28)], "densenet169": [(128, 28, 28), (256, 28, 28)],
    "densenet201": [(128, 28, 28), (256, 28, 28)], "inception_v3": [(256, 25, 25), (288, 25, 25)],
    "mobilenet_v3_large": [(24, 56, 56), (40, 28, 28)], "efficientnet_b0": [(24, 56, 56), (40, 28, 28)],
    "convnext_tiny": [(96, 56, 56), (192, 28, 28)],
}


def test_catalogue_lists_every_required_backbone():
    assert set(DOCUMENTED_SHAPES) | {"audiocsrnet"} == set(presets.list_backbones())


@pytest.mark.parametrize("name", sorted(DOCUMENTED_SHAPES))
@pytest.mark.parametrize("exit_type", ["slvit", "cnn"])
def test_every_backbone_preset_builds_with_documented_branch_shapes(name, exit_type):
    """Built on the meta device (no weight init, no arithmetic): branch shapes as documented, exits
    sized for them (paper presets on the paper backbones, for_feature_map elsewhere), and the SL-ViT exit
    is not larger than the CNN exit in parameters and FLOPs (the paper's comparison)."""
    with torch.device("meta"):
        net = presets.build(name, exit_type=exit_type, num_outputs=7, exit_backend="torch")
    assert net.branch_names == ["b1", "b2"]
    shapes = net.feature_shapes(torch.empty(1, 3, 224, 224, device="meta"))
    got = [shapes[p.split("#")[0]][1:] for p in net.exit_paths]
    assert got == DOCUMENTED_SHAPES[name]
    kind = SLViTExit if exit_type == "slvit" else CNNExit
    for exit_module, (C, H, W) in zip(net.exits.values(), got):
        assert isinstance(exit_module, kind)
        c = exit_module.config
        assert (c.in_channels, *c.feature_size, c.num_outputs) == (C, H, W, 7)
        if name not in presets.PAPER_BACKBONES:
            other = (CNNExitConfig if exit_type == "slvit" else SLViTConfig).for_feature_map(C, (H, W), 7)
            assert c == type(c).for_feature_map(C, (H, W), 7)
            slvit, cnn = (c, other) if exit_type == "slvit" else (other, c)
            assert slvit.num_params() <= cnn.num_params() and slvit.flops() <= cnn.flops()


def test_small_backbone_builds_for_real_and_runs():
    torch.manual_seed(0)
    net = presets.build("resnet18", num_outputs=5, input_size=32, exit_backend="torch")
    outs = net(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, 5)] * 3
    assert [e.config.feature_size for e in net.exits.values()] == [(8, 8), (4, 4)]
    assert net.classifier_replaced is False and net.weights_notes == []


def test_exit_paths_and_name_errors():
    net = presets.build("resnet18", exit_paths=["layer3"], input_size=64, exit_backend="torch")
    assert net.exit_paths == ["layer3"] and net.branch_names == ["layer3"]
    assert net.exits["layer3"].config.in_channels == 256
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        presets.build("resnt18")
    with pytest.raises(ValueError, match="no module.*layer9"):
        presets.build("resnet18", exit_paths=["layer9"], input_size=32)
    assert presets.canonical_name("ResNet-18") == "resnet18"
    assert presets.canonical_name("mobilenetv3_large") == "mobilenet_v3_large"


def test_audiocsrnet_takes_an_int_input_size_like_the_other_presets():
    """An int is the image side (the audio input keeps its default shape), as for every other preset."""
    net = presets.build("audiocsrnet", input_size=64)
    assert net.input_size[0] == (3, 64, 64)
    image, audio = presets.example_input("audiocsrnet", 2, input_size=64)
    assert image.shape == (2, 3, 64, 64) and [o.shape for o in net(image, audio)][-1] == (2, 1)
