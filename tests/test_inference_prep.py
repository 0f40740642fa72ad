"""prepare_for_inference / fold_batchnorm: BatchNorm folded into convolutions only where the dataflow
proves it safe, outputs equal to the unfolded network, early exit unchanged, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import slvit_fast as sf
from slvit_fast import presets
from slvit_fast.policies import MaxSoftmax


def _randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from identity, so a wrong fold cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))


def _net(seed: int = 0) -> sf.MultiExitNetwork:
    torch.manual_seed(seed)
    net = presets.build("resnet18", input_size=64).eval()
    _randomize_batchnorms(net.backbone, seed)
    return net


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


@torch.no_grad()
def test_folded_network_matches_the_original_exits_and_final_output():
    net = _net()
    x = presets.example_input("resnet18", 5, input_size=64)
    ref = net(x)
    report = sf.fold_batchnorm(net)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.backbone.modules())
    assert len(report.folded) == 20 - n_bn and len(report.folded) >= 18  # resnet18: 20 BatchNorms
    assert {p for _, p in report.skipped} == {p for p, m in net.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    out = net(x)
    assert len(out) == len(ref)
    for a, b in zip(ref, out):
        assert _rel(a, b) < 1e-5


@torch.no_grad()
def test_prepare_for_inference_channels_last_and_early_exit_agree():
    net = _net(1)
    x = presets.example_input("resnet18", 9, input_size=64)
    outs = net(x)
    conf = torch.softmax(outs[0], -1).amax(-1)
    # a threshold halfway between two well-separated confidences: float rounding cannot move a sample
    s = conf.sort().values
    gaps = (s[1:] - s[:-1])
    k = int(gaps.argmax())
    policy = MaxSoftmax([float((s[k] + s[k + 1]) / 2)] + [None] * (net.num_exits - 1))
    ref = net.early_exit(x, policy)
    report = sf.prepare_for_inference(net)
    assert report.memory_format == "channels_last" and report.folded
    assert net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    got = net.early_exit(x.contiguous(memory_format=torch.channels_last), policy)
    assert torch.equal(got.exit_index, ref.exit_index)
    assert _rel(ref.outputs, got.outputs) < 1e-5 and ref.counts == got.counts and 0 < ref.counts[0] < 9


@torch.no_grad()
def test_an_exit_point_conv_keeps_its_batchnorm():
    torch.manual_seed(0)
    net = presets.build("resnet152", input_size=64).eval()  # resnet152-b1 reads layer2.0.conv2
    report = sf.fold_batchnorm(net)
    skipped = dict(report.skipped)
    assert "layer2.0.bn2" in skipped and "exit point" in skipped["layer2.0.bn2"]
    assert isinstance(net.backbone.get_submodule("layer2.0.bn2"), nn.BatchNorm2d)
    assert isinstance(net.backbone.get_submodule("layer2.0.bn1"), nn.Identity)


class _Unsafe(nn.Module):
    """Each pair here must be left alone, for the reason given."""

    def __init__(self):
        super().__init__()
        self.c_shared_out = nn.Conv2d(3, 4, 3, padding=1)   # output also used by the residual add
        self.bn_shared_out = nn.BatchNorm2d(4)
        self.c_twice = nn.Conv2d(4, 4, 1)                    # called twice
        self.bn_twice_a = nn.BatchNorm2d(4)
        self.bn_twice_b = nn.BatchNorm2d(4)
        self.c_ok = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_ok = nn.BatchNorm2d(4)
        self.c_nostats = nn.Conv2d(4, 4, 1)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.lin = nn.Linear(4, 4)
        self.bn_after_linear = nn.BatchNorm1d(4)

    def forward(self, x):
        a = self.c_shared_out(x)
        y = self.bn_shared_out(a) + a
        y = self.bn_twice_a(self.c_twice(y)) + self.bn_twice_b(self.c_twice(y))
        y = torch.relu(self.bn_ok(self.c_ok(y)))
        y = self.bn_nostats(self.c_nostats(y))
        return self.bn_after_linear(self.lin(y.mean((2, 3))))


@torch.no_grad()
def test_only_provably_safe_pairs_are_folded():
    torch.manual_seed(0)
    m = _Unsafe().eval()
    _randomize_batchnorms(m)
    x = torch.randn(3, 3, 8, 8)
    ref = m(x)
    report = sf.fold_batchnorm(m)
    assert report.folded == [("c_ok", "bn_ok")]
    reasons = dict(report.skipped)
    assert "also used elsewhere" in reasons["bn_shared_out"]
    assert "called 2 times" in reasons["bn_twice_a"] and "called 2 times" in reasons["bn_twice_b"]
    assert "running statistics" in reasons["bn_nostats"]
    assert "Linear" in reasons["bn_after_linear"]
    assert m.c_ok.bias is not None  # the fold gave the bias-free conv a bias
    assert _rel(ref, m(x)) < 1e-5


def test_training_mode_is_refused_and_nothing_changes():
    m = _Unsafe().train()
    with pytest.raises(ValueError, match="training mode.*eval"):
        sf.fold_batchnorm(m)
    with pytest.raises(ValueError, match="training mode"):
        sf.prepare_for_inference(m)
    assert isinstance(m.bn_ok, nn.BatchNorm2d)


def test_bad_memory_format_names_the_value():
    with pytest.raises(ValueError, match="'nhwc'"):
        sf.prepare_for_inference(_Unsafe().eval(), memory_format="nhwc")


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace a branch on data
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_is_left_unchanged_with_a_warning():
    m = _DataDependent().eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = sf.fold_batchnorm(m)
    assert not report.folded and report.skipped[0][0] == "bn" and "torch.fx" in report.skipped[0][1]
    assert any("nothing folded" in str(x.message) for x in w)
    assert isinstance(m.bn, nn.BatchNorm2d)


def test_a_folded_unfrozen_backbone_refuses_to_train():
    torch.manual_seed(0)
    net = presets.build("resnet18", input_size=64, freeze_backbone=False).eval()
    sf.fold_batchnorm(net)
    with pytest.raises(RuntimeError, match="folded"):
        net.train()
    frozen = presets.build("resnet18", input_size=64).eval()
    sf.fold_batchnorm(frozen)
    frozen.train()  # exits train; the frozen backbone stays in eval
    assert not frozen.backbone.training and frozen.exit_list()[0].training


@torch.no_grad()
def test_half_precision_fold_is_computed_in_float64():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1).half(), nn.BatchNorm2d(16).half()
    seq = nn.Sequential(conv, bn).eval()
    _randomize_batchnorms(seq)
    w64 = conv.weight.double() * (bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()).reshape(-1, 1, 1, 1)
    sf.fold_batchnorm(seq)
    assert isinstance(seq[1], nn.Identity) and seq[0].weight.dtype == torch.float16
    assert torch.equal(seq[0].weight, w64.half())
