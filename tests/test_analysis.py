"""slvit_fast.analysis on hand-made outputs (exact expectations) and on a small network."""

from __future__ import annotations

import pytest
import torch

from slvit_fast import analysis, policies as P

# 4 samples, 2 early exits + final, 3 classes; labels 0, 1, 2, 0
LABELS = torch.tensor([0, 1, 2, 0])
HOT = torch.eye(3) * 10


def outputs():
    o0 = HOT[[0, 0, 2, 1]]   # right on samples 0, 2
    o1 = HOT[[0, 1, 1, 1]]   # right on 0, 1
    final = HOT[[1, 1, 1, 1]]  # right on 1 only
    return [o0, o1, final]


def test_per_exit_accuracy_and_error():
    assert analysis.per_exit_accuracy(outputs(), LABELS) == [0.5, 0.5, 0.25]
    y = [torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [3.0]])]
    assert analysis.per_exit_error(y, torch.tensor([2.0, 2.0])) == [0.5, 1.0]


def test_overthinking():
    o = analysis.overthinking(outputs(), LABELS)
    # sample 0 (right at exits 0 and 1) and sample 2 (right at exit 0) are wrong at the final output
    assert o.count == 2 and o.rate == 0.5
    assert o.per_exit == [0.5, 0.25]


def test_oracle_and_realistic_upper_bounds():
    costs = [1.0, 2.0, 10.0]
    b = analysis.upper_bounds(outputs(), LABELS, costs)
    assert b.accuracy == 0.75 and b.hopeless == 0.25   # sample 3 is right nowhere
    # oracle: sample 0 -> exit 0, 1 -> exit 1, 2 -> exit 0, 3 -> nothing
    assert b.oracle_flops == pytest.approx((1 + 2 + 1 + 0) / 4)
    assert b.realistic_flops == pytest.approx((1 + 2 + 1 + 10) / 4)
    assert b.oracle_exit_fractions == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        analysis.upper_bounds(outputs(), LABELS, costs[:2])


def test_accuracy_flops_curve():
    costs = [1.0, 2.0, 10.0]
    soft = [o / 10 for o in outputs()]  # softer logits: max softmax ~0.58
    curve = analysis.accuracy_flops_curve(soft, LABELS, costs, thresholds=[0.0, 0.99])
    assert curve[0].flops == 1.0 and curve[0].accuracy == 0.5 and curve[0].exit_fractions == [1.0, 0.0, 0.0]
    assert curve[1].flops == 10.0 and curve[1].accuracy == 0.25
    ent = analysis.accuracy_flops_curve(soft, LABELS, costs, policy=P.Entropy, thresholds=[10.0])
    assert ent[0].exit_fractions[0] == 1.0
    default = analysis.accuracy_flops_curve(soft, LABELS, costs)
    assert len(default) == 21
    assert [p.flops for p in default] == sorted(p.flops for p in default)
