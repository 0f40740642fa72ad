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


# -- what a dataflow check must not miss (hostile review, session 7) ----------------------------------------

def _conv_bn(cin=3, c=4) -> nn.Sequential:
    m = nn.Sequential(nn.Conv2d(cin, c, 3), nn.BatchNorm2d(c)).eval()
    _randomize_batchnorms(m)
    return m


class _AliasedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)  # a handle to the BatchNorm inside `features`: one object, two names
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), self.bn, nn.ReLU())

    def forward(self, x):
        return self.features(x)


class _WeightRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):  # a second branch with conv's weights (shared-weight ASPP style); bn2's stats read
        y = self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight, padding=2, dilation=2)
        return y + self.bn2(self.conv2(x)) * self.bn2.running_var.mean()


class _ProxyBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if isinstance(y, torch.Tensor):  # False on an fx proxy: the traced graph is not what runs
            y = y + y.mean()
        return self.bn(y)


@torch.no_grad()
@pytest.mark.parametrize("make, reason", [
    (_AliasedBN, "several names"),
    (_WeightRead, "read directly"),
])
def test_modules_reachable_or_read_elsewhere_are_not_folded(make, reason):
    torch.manual_seed(0)
    m = make().eval()
    _randomize_batchnorms(m)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    report = sf.fold_batchnorm(m)
    assert not report.folded and all(reason in why for _, why in report.skipped), report
    assert torch.equal(m(x), ref)


@torch.no_grad()
def test_a_conv_shared_with_an_exit_is_not_folded():
    net = _net(2)
    shared = net.backbone.layer1[1].conv1
    net.exits[list(net.exits.keys())[0]].shared_conv = shared  # the exit holds the same module object
    report = sf.fold_batchnorm(net)
    assert dict(report.skipped)["layer1.1.bn1"].startswith("convolution 'layer1.1.conv1' is registered under several")
    assert isinstance(net.backbone.layer1[1].bn1, nn.BatchNorm2d)


@torch.no_grad()
def test_hooks_and_patched_forwards_fx_cannot_see_are_respected():
    x = torch.randn(2, 3, 8, 8)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, i: None)
    try:
        m = _conv_bn()
        with pytest.warns(UserWarning, match="global module hook"):
            assert not sf.fold_batchnorm(m).folded
    finally:
        handle.remove()
    m = _conv_bn()
    original = m[1].forward
    m[1].forward = lambda t: original(t) + 1
    ref = m(x)
    assert "patched" in sf.fold_batchnorm(m).skipped[0][1] and torch.equal(m(x), ref)


@torch.no_grad()
def test_example_inputs_catch_what_the_trace_cannot_and_undo_the_fold():
    torch.manual_seed(0)
    m = _ProxyBranch().eval()
    _randomize_batchnorms(m)
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    w, b = m.conv.weight, m.conv.bias
    with pytest.raises(RuntimeError, match="differ from the original.*undone"):
        sf.fold_batchnorm(m, example_inputs=x)
    assert isinstance(m.bn, nn.BatchNorm2d) and m.conv.weight is w and m.conv.bias is b
    assert torch.equal(m(x), ref)
    # on a network where the fold is right, the check passes and reports the difference it measured
    net = _net(3)
    xs = presets.example_input("resnet18", 3, input_size=64)
    report = sf.prepare_for_inference(net, example_inputs=xs)
    assert report.folded and report.checked_rel_diff < 1e-5 and "outputs checked" in str(report)


@torch.no_grad()
def test_conv3d_networks_get_channels_last_3d_and_the_fold():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Flatten(), nn.LazyLinear(3)).eval()
    _randomize_batchnorms(m)
    x = torch.randn(2, 2, 5, 6, 7)
    ref = m(x)
    report = sf.prepare_for_inference(m)
    assert report.folded == [("0", "1")]
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel(ref, m(x)) < 1e-5


def test_prepare_under_inference_mode_leaves_trainable_parameters():
    m = _conv_bn()
    m[0].weight.requires_grad_(True)
    with torch.inference_mode():
        sf.prepare_for_inference(m)
    assert not m[0].weight.is_inference() and m[0].weight.is_contiguous(memory_format=torch.channels_last)
    m(torch.randn(1, 3, 8, 8)).sum().backward()
    assert m[0].weight.grad is not None


def test_keep_is_validated_and_a_string_is_one_path():
    m = _conv_bn()
    with pytest.raises(ValueError, match="keep='nope'"):
        sf.fold_batchnorm(m, keep="nope")
    report = sf.fold_batchnorm(m, keep="1")
    assert not report.folded and "exit point" in report.skipped[0][1]


def test_folding_inside_a_backbone_submodule_still_blocks_training_an_unfrozen_backbone():
    torch.manual_seed(0)
    net = presets.build("resnet18", input_size=64, freeze_backbone=False).eval()
    sf.fold_batchnorm(net.backbone.layer1)
    with pytest.raises(RuntimeError, match="folded"):
        net.train()
