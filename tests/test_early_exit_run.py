"""The per-call side of ``net.early_exit`` (slvit_fast/early_exit_run.py): no per-call walk of the module
tree (it cost ~1.3 ms per call on ResNet152, issue #14 item 3), a submodule replaced after construction is
still watched, and the answers equal the brute-force policy on every exit's outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slvit_fast import CNNExit, CNNExitConfig, MultiExitNetwork, policies as P

K = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def small_net() -> MultiExitNetwork:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K),
    )
    e0 = CNNExit(CNNExitConfig(in_channels=8, feature_size=8, filters=4, head_hidden=8, num_outputs=K))
    e1 = CNNExit(CNNExitConfig(in_channels=8, feature_size=4, filters=4, head_hidden=8, num_outputs=K))
    return MultiExitNetwork(backbone, {"2": e0, "4": e1}).eval()


def x_and_policy(net):
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = net(x)
    conf = torch.softmax(outs[0], 1).amax(1).sort().values
    return x, outs, P.MaxSoftmax([float((conf[4] + conf[5]) / 2), None])  # half of the batch leaves at exit 0


def test_early_exit_does_not_walk_the_module_tree_per_call(monkeypatch):
    net = small_net()
    x, outs, policy = x_and_policy(net)
    walks = []
    for name in ("modules", "named_modules"):
        real = getattr(net.backbone, name)
        monkeypatch.setattr(net.backbone, name, lambda *a, real=real, name=name, **k: walks.append(name) or real(*a, **k))
    r = net.early_exit(x, policy)
    assert walks == []
    expected = P.apply(policy, outs)
    assert r.counts == expected.counts == [5, 0, 5]
    assert torch.equal(r.exit_index, expected.exit_index)
    torch.testing.assert_close(r.outputs, expected.outputs, rtol=1e-5, atol=1e-5)


def test_submodule_replaced_after_construction_is_still_watched():
    net = small_net()
    x, _, policy = x_and_policy(net)
    net.backbone[4] = nn.ReLU()          # a new module object at the path of exit 1 (same function)
    net.backbone[3] = copy.deepcopy(net.backbone[3])
    with torch.no_grad():
        outs = net(x)                    # exit 1 still reads path "4": no "did not run" error
    r = net.early_exit(x, policy)
    expected = P.apply(policy, outs)
    assert r.counts == expected.counts and r.evaluated == [10, 5, 5]
    torch.testing.assert_close(r.outputs, expected.outputs, rtol=1e-5, atol=1e-5)


def test_batchnorm_in_training_mode_still_refused():
    net = small_net()
    x, _, policy = x_and_policy(net)
    net.backbone[1].train()              # the check uses the BatchNorm list made at construction
    with pytest.raises(RuntimeError, match="eval mode"):
        net.early_exit(x, policy)


def test_compaction_keeps_a_channels_last_backbone_channels_last():
    """Rows leave a channels_last map as channels_last rows (index_select alone returns NCHW, which would
    put a layout conversion in front of every later conv); answers equal the brute-force policy."""
    net = small_net().to(memory_format=torch.channels_last)
    x, outs, policy = x_and_policy(net)
    x = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    h = net.backbone[3].register_forward_pre_hook(
        lambda _m, a: layouts.append((a[0].shape[0], a[0].is_contiguous(memory_format=torch.channels_last))))
    try:
        r = net.early_exit(x, policy)
    finally:
        h.remove()
    assert layouts == [(5, True)]        # compacted at module "2" (exit 0), still channels_last
    expected = P.apply(policy, outs)
    assert r.counts == expected.counts
    torch.testing.assert_close(r.outputs, expected.outputs, rtol=1e-5, atol=1e-5)
