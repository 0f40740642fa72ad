"""``slvit_fast.export``: an early-exit network as one program per stage plus its policy, run by
``EarlyExitRunner`` with real batch compaction on ONNX Runtime or torch (issue #13 item 4)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import slvit_fast as sf
from slvit_fast import policies
from slvit_fast.export import (EarlyExitRunner, SegmentationError, export_early_exit, policy_from_dict,
                               policy_to_dict)

torchvision = pytest.importorskip("torchvision")


def _small_slvit(channels: int, size: int, patch: int) -> sf.SLViTExit:
    cfg = sf.SLViTConfig(in_channels=channels, feature_size=size, patch_size=patch, embed_dim=16, num_heads=2,
                         mlp_dim=32, head_hidden=16, num_outputs=10)
    return sf.SLViTExit(cfg)


@pytest.fixture(scope="module")
def net_and_inputs():
    """ResNet18 (random weights) at 64x64; exit 0 inside a block (``layer2.0.conv2``: its compaction point
    is the block ``layer2.0``, so the first program returns both), exit 1 at ``layer3``."""
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(num_classes=10)
    net = sf.MultiExitNetwork(backbone, {"layer2.0.conv2": _small_slvit(128, 8, 2),
                                         "layer3": _small_slvit(256, 4, 1)}).eval()
    x = torch.randn(24, 3, 64, 64)
    with torch.no_grad():
        outs = net(x)
    thresholds = [_threshold_between_samples(o) for o in outs[:-1]]
    return net, x, policies.MaxSoftmax(thresholds)


def _threshold_between_samples(logits: torch.Tensor) -> float:
    """A max-softmax threshold that sends about a third of the samples out, far (relative to float
    rounding across runtimes) from every sample's score."""
    s = torch.softmax(logits.double(), 1).amax(1).sort().values
    gaps = s[1:] - s[:-1]
    lo = len(s) // 2
    k = lo + int(gaps[lo:-1].argmax())
    assert gaps[k] > 1e-5
    return float((s[k] + s[k + 1]) / 2)


@pytest.mark.parametrize("fmt", ["torch", "onnx"])
def test_runner_equals_net_early_exit(net_and_inputs, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    net, x, policy = net_and_inputs
    manifest = export_early_exit(net, policy, x[:2], str(tmp_path), format=fmt)
    data = json.loads(open(manifest).read())
    assert [len(s["exits"]) for s in data["stages"]] == [1, 1]
    assert data["stages"][0]["outputs"] == 2  # layer2.0's output and layer2.0.conv2's (exit 0 reads it)
    assert policy_from_dict(json.loads((tmp_path / "policy.json").read_text())).thresholds == policy.thresholds

    runner = EarlyExitRunner(str(tmp_path))
    for batch in (x, x[:7], x[5:6]):
        expected = net.early_exit(batch, policy)
        got = runner(batch)
        assert torch.equal(got.exit_index, expected.exit_index)
        assert got.counts == expected.counts and got.evaluated == expected.evaluated
        tol = 1e-5 if fmt == "torch" else 1e-4
        torch.testing.assert_close(got.outputs, expected.outputs, rtol=tol, atol=tol)
    full = net.early_exit(x, policy)
    assert all(c > 0 for c in full.counts), full.counts  # every exit and the tail answered someone

    # an empty batch gets the same empty answer as net.early_exit; a wrong sample shape or dtype is a
    # clear error naming both, not a runtime's message from deep inside a program
    empty, want = runner(x[:0]), net.early_exit(x[:0], policy)
    assert empty.outputs.shape == want.outputs.shape == (0, 10) and empty.outputs.dtype == want.outputs.dtype
    assert empty.exit_index.shape == (0,) and empty.counts == want.counts == [0, 0, 0]
    with pytest.raises(ValueError, match=r"input of shape \(2, 3, 32, 32\).*samples of shape \(3, 64, 64\)"):
        runner(x[:2, :, :32, :32])
    with pytest.raises(ValueError, match=r"input of shape \(3, 64, 64\)"):
        runner(x[0])
    with pytest.raises(TypeError, match="input of dtype float64.*exported for float32"):
        runner(x[:2].double())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("policy", [policies.MaxSoftmax([0.3, None]), policies.Entropy(0.5, normalized=True),
                                    policies.Margin([0.1, 0.2]), policies.Patience(1),
                                    policies.ClassThresholds([[0.5, float("inf")], [0.2, 0.9]])])
def test_policy_json_round_trip(policy):
    data = json.loads(json.dumps(policy_to_dict(policy)))
    again = policy_from_dict(data)
    assert type(again) is type(policy) and repr(again) == repr(policy)


@pytest.mark.parametrize("policy,match", [
    (policies.RegressionCriterion(lambda i, y, prev: True), "RegressionCriterion policy holds a Python callable"),
    (policies.Deadline(0.01), "Deadline"),
])
def test_unserializable_policies_are_clear_errors(net_and_inputs, tmp_path, policy, match):
    net, x, _ = net_and_inputs
    with pytest.raises(TypeError, match=match):
        export_early_exit(net, policy, x[:2], str(tmp_path), format="torch")


class _SkipAround(nn.Module):
    """forward = b(a(x)) + x: not a chain of its children."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))

    def forward(self, x):
        return self.head(self.b(self.a(x)) + x)


def test_backbone_that_is_not_a_chain_is_a_clear_error(tmp_path):
    cfg = sf.CNNExitConfig(in_channels=3, feature_size=8, filters=2, head_hidden=4, num_outputs=10)
    net = sf.MultiExitNetwork(_SkipAround(), {"a": sf.CNNExit(cfg)}).eval()
    with pytest.raises(SegmentationError, match="cannot be cut into a chain"):
        export_early_exit(net, policies.MaxSoftmax(0.5), torch.randn(2, 3, 8, 8), str(tmp_path), format="torch")


def test_runner_on_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder written by export_early_exit"):
        EarlyExitRunner(str(tmp_path))
