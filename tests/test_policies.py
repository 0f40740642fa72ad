"""Policies beyond the brute-force comparisons of test_multi_exit.py: budgeted-batch calibration
(seeds/004 Algorithm 1), user extras, and early exit on a small custom backbone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slvit_fast import CNNExit, CNNExitConfig, MultiExitNetwork, policies as P

from small_multi_exit import K, loader, tiny_net  # noqa: E402


def test_sequential_backbone_compaction_points():
    net = tiny_net()
    assert net.exit_paths == ["1", "4"] and net.compaction_points == ["1", "4"]


def test_calibrate_budget_follows_algorithm_1():
    net = tiny_net()
    val = loader()
    m = sum(len(y) for _, y in val)
    costs = [1.0, 2.0, 10.0]
    cal = P.calibrate_budget(net, val, budget_flops=4.0, iterations=40, base=20, exit_costs=costs)
    assert len(cal.candidates) == 40
    for c in cal.candidates:
        assert sum(c.q) == pytest.approx(1.0)
        # q_k proportional to (p/b)^k: decreasing for p < b, flat at p = b, increasing after
        if c.p < 1:
            assert c.q[0] > c.q[1] > c.q[2]
        elif c.p > 1:
            assert c.q[0] < c.q[1] < c.q[2]
        # on the validation set the quotas are met exactly (no ties among float confidences)
        planned = [round(q * m) for q in c.q[:-1]]
        got = [round(f * m) for f in c.exit_fractions[:-1]]
        assert got == [min(pl, m) for pl in planned] or sum(planned) >= m
        assert c.expected_flops == pytest.approx(sum(f * cost for f, cost in zip(c.exit_fractions, costs)))
    flops = [c.expected_flops for c in cal.candidates]
    assert flops[0] < flops[-1]
    assert cal.best is not None and cal.best.expected_flops <= 4.0
    assert cal.best.accuracy == max(c.accuracy for c in cal.candidates if c.expected_flops <= 4.0)
    # the thresholds drive real early exit, with the same result as the brute force
    x = val[0][0]
    policy = cal.best.policy()
    with torch.no_grad():
        expected = P.apply(policy, net(x))
    result = net.early_exit(x, policy)
    assert torch.equal(result.exit_index, expected.exit_index)
    assert P.calibrate_budget(net, val, budget_flops=0.5, exit_costs=costs).best is None


def test_calibrate_budget_default_costs_come_from_accounting():
    net = tiny_net()
    cal = P.calibrate_budget(net, loader(1), budget_flops=1e12, iterations=3)
    assert len(cal.exit_costs) == 3 and cal.exit_costs[0] < cal.exit_costs[1] < cal.exit_costs[2]
    with pytest.raises(ValueError, match="budget_flops"):
        P.calibrate_budget(net, loader(1), budget_flops=float("nan"))


def test_user_supplied_extra_input():
    """An audiovisual exit whose extra input comes from the caller, not from a backbone module."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, K))
    av = CNNExit(CNNExitConfig(in_channels=8, feature_size=(8, 8), filters=4, head_hidden=8, num_outputs=K,
                               extra_dim=6))
    net = MultiExitNetwork(backbone, {"1": av}).eval()
    x, a = torch.randn(7, 3, 8, 8), torch.randn(7, 6)
    conf = None
    with torch.no_grad():
        feats = net.branch_features(x, extra=a)
        out0 = av(feats[0][0], extra=a)
        conf = torch.softmax(out0, 1).amax(1).sort().values
    thr = float((conf[3] + conf[4]) / 2)
    r = net.early_exit(x, P.MaxSoftmax(thr), extra=a)
    assert r.counts == [3, 4]
    torch.testing.assert_close(r.outputs[r.exit_index == 0], out0[r.exit_index == 0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, extra=a)[0], out0)
        assert net.branch_features(x, extra={"1": a})[0][1] is not None
    r2 = net.early_exit(x, P.MaxSoftmax(thr), extra={"1": a})
    assert torch.equal(r.exit_index, r2.exit_index)
    with pytest.raises(ValueError, match="not an exit path"):
        net.early_exit(x, P.MaxSoftmax(thr), extra={"2": a})


def test_batchnorm_in_training_mode_is_refused():
    net = tiny_net()
    net.freeze_backbone = False
    net.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        net.early_exit(torch.randn(2, 3, 16, 16), P.MaxSoftmax(0.5))


def test_unsafe_compaction_point_is_reported():
    """A backbone whose forward is not a chain of its children: compacting at a child breaks it."""

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, K))

        def forward(self, x):
            return self.head(self.b(self.a(x)) + x)  # uses x after a and b

    exit_ = CNNExit(CNNExitConfig(in_channels=3, feature_size=(4, 4), filters=2, head_hidden=4, num_outputs=K))
    net = MultiExitNetwork(Skip(), {"a": exit_}).eval()
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        outs = net(x)
    conf = torch.softmax(outs[0], 1).amax(1).sort().values
    policy = P.MaxSoftmax(float((conf[1] + conf[2]) / 2))
    with pytest.raises(RuntimeError):  # the skip connection sees 2 rows + 4 rows
        net.early_exit(x, policy)
    # declaring the backbone as no chain makes compaction wait for ... nothing safe: a clear error
    with pytest.raises(ValueError, match="compact_at"):
        MultiExitNetwork(Skip(), {"a": exit_}, backbone_is_chain=False)
    ok = MultiExitNetwork(net.backbone, {"a": exit_}, compact_at={"a": "head"}).eval()
    r = ok.early_exit(x, policy)
    assert torch.equal(r.exit_index, P.apply(policy, outs).exit_index) and r.counts == [2, 2]


def test_thresholds_none_and_scalar():
    p = P.MaxSoftmax([None, 0.3])
    assert p.threshold(0) is None and p.threshold(1) == 0.3
    assert P.Entropy(0.5, normalized=True).score(torch.zeros(2, 4)).tolist() == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="single threshold"):
        P.MaxSoftmax(None)
    assert math.isinf(P.Deadline(math.inf).seconds)


def test_in_place_modification_of_a_waiting_capture_is_detected():
    """An exit reading conv output "0" plus an extra from a later module: the in-place ReLU "1" overwrites
    "0"'s output before the extra exists, so the exit would read wrong data - refused."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, K))
    exit_ = CNNExit(CNNExitConfig(in_channels=4, feature_size=(4, 4), filters=2, head_hidden=4, num_outputs=K,
                                  extra_dim=4))
    net = MultiExitNetwork(backbone, {"0": (exit_, "3")}).eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="modified in place"):
        net(torch.randn(2, 3, 4, 4))
    backbone[1].inplace = False
    with torch.no_grad():
        assert net(torch.randn(2, 3, 4, 4))[0].shape == (2, K)


def test_apply_with_mismatched_batch_sizes_names_the_shapes():
    outs = [torch.randn(4, K), torch.randn(3, K), torch.randn(4, K)]
    with pytest.raises(ValueError, match=r"same batch size .* got shapes \[\(4, 5\), \(3, 5\), \(4, 5\)\]"):
        P.apply(P.MaxSoftmax(0.5), outs)
    with pytest.raises(ValueError, match=r"same batch size"):
        P.apply(P.MaxSoftmax(0.5), [torch.randn(4, K), torch.tensor(1.0)])
