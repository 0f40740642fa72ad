"""FLOP/parameter accounting: torchvision's published GMACs, exit FLOP formulas, the paper-style table."""

from __future__ import annotations

import warnings

import pytest
import torch

from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit, accounting, presets

warnings.filterwarnings("ignore", category=RuntimeWarning)
_NETS: dict = {}


def built(name: str, exit_type: str = "slvit"):
    """Preset networks are built once per test session (random init of a 60M-parameter backbone is slow)."""
    if (name, exit_type) not in _NETS:
        _NETS[(name, exit_type)] = presets.build(name, exit_type=exit_type, exit_backend="torch")
    return _NETS[(name, exit_type)]


@pytest.fixture(scope="module", autouse=True)
def _single_thread_and_fresh_nets(one_thread):
    yield
    _NETS.clear()


@pytest.mark.parametrize(
    "name, size, gmacs",
    [("resnet152", 224, 11.51), ("densenet201", 224, 4.29), ("inception_v3", 299, 5.71)],
)
def test_torchvision_published_gmacs(name, size, gmacs):
    """torchvision's model cards: ResNet152 11.51, DenseNet201 4.29, Inception-v3 5.71 GFLOPS (= GMACs)."""
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    with torch.device("meta"):  # shapes only: no 60M-parameter random init
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
    flops, _ = accounting.count_flops(model, (3, size, size))
    assert abs(flops / 2e9 - gmacs) / gmacs < 0.01, flops / 2e9


@pytest.mark.parametrize(
    "config",
    [
        SLViTConfig(in_channels=128, feature_size=(28, 28), patch_size=(4, 4)),
        SLViTConfig(in_channels=512, feature_size=(72, 128), patch_size=(8, 8), extra_tokens=1, extra_dim=128,
                    num_outputs=1),
        SLViTConfig(in_channels=24, feature_size=(6, 9), patch_size=(3, 3), embed_dim=16, num_heads=3, key_dim=8,
                    num_layers=2, mlp_dim=40, head_hidden=20),
    ],
)
def test_slvit_flop_formula_matches_flop_counter(config):
    """The closed form counts every matmul of the reference exit, attention QK^T and PV included."""
    from torch.utils.flop_counter import FlopCounterMode

    exit_module = SLViTExit(config, backend="torch").eval()
    x = torch.randn(1, config.in_channels, *config.feature_size)
    extra = torch.randn(1, config.extra_tokens, config.extra_dim) if config.extra_tokens else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        exit_module(x, extra=extra)
    assert accounting.slvit_flops(config) == counter.get_total_flops()
    c = config
    attention = 2 * 2 * c.num_heads * c.num_tokens ** 2 * c.key_dim * c.num_layers
    assert attention > 0 and accounting.slvit_flops(config) > attention


@pytest.mark.parametrize("extra_dim", [0, 128])
def test_cnn_exit_flop_formula_matches_flop_counter(extra_dim):
    from torch.utils.flop_counter import FlopCounterMode

    config = CNNExitConfig(in_channels=64, feature_size=(12, 20), pool_size=(4, 4), extra_dim=extra_dim)
    exit_module = CNNExit(config).eval()
    x = torch.randn(1, 64, 12, 20)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        exit_module(x, extra=torch.randn(1, extra_dim) if extra_dim else None)
    assert accounting.cnn_exit_flops(config) == counter.get_total_flops()


@pytest.mark.parametrize(
    "name, exit_type",
    [("resnet152", "slvit"), ("resnet152", "cnn"), ("densenet201", "slvit"), ("inception_v3", "slvit"),
     ("audiocsrnet", "slvit"), ("audiocsrnet", "cnn")],
)
def test_summary_table_for_each_preset(name, exit_type, capsys):
    net = built(name, exit_type)
    s = accounting.summary(net)
    print(s)
    table = capsys.readouterr().out
    assert len(s.rows) == net.num_exits + 1
    for r in s.rows[:-1]:
        assert r.params > 0
        assert 0 < r.backbone_flops < s.backbone_flops
        assert r.cumulative_flops > r.backbone_flops and r.cost_flops >= r.cumulative_flops
        assert r.speedup == pytest.approx(s.backbone_flops / r.cumulative_flops)
        assert r.name in table and r.module.split(" ")[0] in table
    cum = [r.cumulative_flops for r in s.rows]
    assert cum == sorted(cum)
    assert "speedup" in table and "params" in table


def test_table_values_resnet152():
    net = built("resnet152")
    s = accounting.summary(net)
    assert s.backbone_flops / 2e9 == pytest.approx(11.51, rel=0.01)
    b1, b2, final = s.rows
    assert b1.feature_shape == (1, 128, 28, 28) and b2.feature_shape == (1, 512, 28, 28)
    assert b1.params == sum(p.numel() for p in net.exits["layer2__0__conv2"].parameters())
    assert b1.exit_flops == accounting.slvit_flops(net.exits["layer2__0__conv2"].config)
    assert b2.cumulative_flops == b2.backbone_flops + b1.exit_flops + b2.exit_flops
    # b1's compaction happens at the end of block layer2.0 (conv3 + downsample still run on its rows)
    assert b1.cost_flops > b1.cumulative_flops
    assert final.cumulative_flops == s.backbone_flops + b1.exit_flops + b2.exit_flops


def test_audiocsrnet_matches_paper_table_viii():
    """SL-ViT branches on AudioCSRNet (DISCO, 1024x576): paper speedups 1.49 (V1), 1.48 (AV1), 1.31 (AV2)
    and total FLOPs 328.72B / 330.31B / 373.81B. Our rows also include the earlier exits' FLOPs
    (< 1 GFLOP), so compare within 0.5%."""
    net = built("audiocsrnet")
    s = accounting.summary(net)
    for row, total, speedup in zip(s.rows, (328.72e9, 330.31e9, 373.81e9), (1.49, 1.48, 1.31)):
        assert row.cumulative_flops == pytest.approx(total, rel=0.005)
        assert round(row.speedup, 2) == pytest.approx(speedup, abs=0.011)
