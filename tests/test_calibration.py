"""Issue #13 item 6: FLOPs on the early-exit result, thresholds for target exit fractions, and the
accuracy-vs-FLOPs figure."""

from __future__ import annotations

import pytest
import torch

import slvit_fast as sf
from slvit_fast import accounting, analysis, policies as P
from slvit_fast.calibration import calibrate_fractions

from small_multi_exit import loader, tiny_net  # noqa: E402


def costs_of(net):
    s = accounting.summary(net, (3, 16, 16))
    return [r.cost_flops for r in s.rows], s.backbone_flops


def test_early_exit_result_mean_flops_and_speedup():
    net = tiny_net()
    x = loader(1)[0][0]
    conf = [torch.softmax(o.detach(), 1).amax(1) for o in net(x)[:-1]]
    r = net.early_exit(x, P.MaxSoftmax([float(conf[0].median()), float(conf[1].median())]))
    assert 0 < r.counts[0] < 25 and r.counts[2] > 0
    costs, backbone = costs_of(net)
    want = sum(costs[i] for i in r.exit_index.tolist()) / 25
    assert r.mean_flops == pytest.approx(want, rel=1e-12)
    assert r.flops_speedup == pytest.approx(backbone / want, rel=1e-12)
    assert r.exit_costs == costs and r.backbone_flops == backbone
    # everyone at exit 0 / everyone at the end
    assert net.early_exit(x, P.MaxSoftmax(0.0)).mean_flops == pytest.approx(costs[0])
    end = net.early_exit(x, P.MaxSoftmax([None, None]))
    assert end.mean_flops == pytest.approx(costs[-1]) and end.flops_speedup < 1  # the exits cost extra


def test_flops_are_counted_only_when_asked():
    """early_exit itself runs the backbone once; the FLOP count (a fake run) waits for mean_flops."""
    net = tiny_net()
    calls = []
    h = net.backbone[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        r = net.early_exit(torch.randn(4, 3, 16, 16), P.MaxSoftmax(0.5))
        assert len(calls) == 1
        assert r.mean_flops > 0 and len(calls) == 2      # counted now (fake tensors)
        r2 = net.early_exit(torch.randn(4, 3, 16, 16), P.MaxSoftmax(0.5))
        assert r2.mean_flops > 0 and len(calls) == 3     # cached per input size: no second count
    finally:
        h.remove()


def test_apply_with_costs_and_empty_batch():
    outs = [torch.eye(3)[[0, 1, 2, 0]] * 10, torch.eye(3)[[1, 1, 1, 1]] * 10]
    r = P.apply(P.MaxSoftmax([0.9]), outs, exit_costs=[2.0, 10.0], backbone_flops=8.0)
    assert r.mean_flops == 2.0 and r.flops_speedup == 4.0
    assert P.apply(P.MaxSoftmax([0.9]), outs).mean_flops is None
    empty = P.apply(P.MaxSoftmax([0.9]), [o[:0] for o in outs], exit_costs=[2.0, 10.0], backbone_flops=8.0)
    assert empty.mean_flops != empty.mean_flops  # NaN: no samples
    with pytest.raises(ValueError, match="1 exit costs for 2 outputs"):
        P.apply(P.MaxSoftmax([0.9]), outs, exit_costs=[2.0])


@pytest.mark.parametrize("fractions, counts", [([0.3, 0.2], [30, 20, 50]), ([0.0, 0.5, 0.5], [0, 50, 50]),
                                               ([1.0, 0.0], [100, 0, 0]), ([0.0, 0.0], [0, 0, 100])])
def test_calibrate_fractions_hits_the_targets(fractions, counts):
    net, data = tiny_net(), loader()
    cal = calibrate_fractions(net, data, fractions)
    assert cal.exit_fractions == [c / 100 for c in counts]
    assert cal.target_fractions == pytest.approx([c / 100 for c in counts])
    # the policy reproduces them with real early exit, batch by batch
    got = [0, 0, 0]
    correct = 0
    for x, y in data:
        r = net.early_exit(x, cal.policy())
        got = [a + b for a, b in zip(got, r.counts)]
        correct += int((r.outputs.argmax(1) == y).sum())
    assert got == counts
    assert cal.accuracy == pytest.approx(correct / 100)
    costs, _ = costs_of(net)
    assert cal.expected_flops == pytest.approx(sum(c * n for c, n in zip(costs, counts)) / 100)


def test_calibrate_fractions_errors():
    net, data = tiny_net(), loader(1)
    with pytest.raises(ValueError, match="3 fractions .* wait|fractions must sum"):
        calibrate_fractions(net, data, [0.5, 0.4, 0.4])
    with pytest.raises(ValueError, match="1 fractions for 2 early exits"):
        calibrate_fractions(net, data, [0.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        calibrate_fractions(net, data, [-0.1, 0.5])
    assert sf.calibrate_fractions is calibrate_fractions


def test_plot_accuracy_flops_writes_the_figure(tmp_path):
    import matplotlib.image

    net, data = tiny_net(), loader()
    outputs, labels = analysis.collect(net, data)
    costs, backbone = costs_of(net)
    curve = analysis.accuracy_flops_curve(outputs, labels, costs)
    entropy = analysis.accuracy_flops_curve(outputs, labels, costs, policy=lambda t: P.Entropy(t, normalized=True))
    per_exit = analysis.per_exit_accuracy(outputs, labels)
    path = analysis.plot_accuracy_flops(
        {"max-softmax": curve, "entropy": entropy}, tmp_path / "fig" / "acc_flops.png",
        backbone=(backbone, per_exit[-1]), exits={"max-softmax": list(zip(costs, per_exit))}, title="tiny")
    data_bytes = path.read_bytes()
    assert data_bytes[:8] == b"\x89PNG\r\n\x1a\n" and data_bytes[12:16] == b"IHDR"
    width, height = int.from_bytes(data_bytes[16:20], "big"), int.from_bytes(data_bytes[20:24], "big")
    assert (width, height) == (640, 440)
    img = matplotlib.image.imread(path)[..., :3]
    for hex_colour in ("#1f77b4", "#ff7f0e"):  # one line per curve, in matplotlib's first two colours
        rgb = torch.tensor([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (torch.from_numpy(img.copy()) - rgb).abs().amax(-1).lt(0.02).sum() > 50, hex_colour
    # the curve holds what policies.apply says: mean FLOPs from every sample's exit
    r = P.apply(P.MaxSoftmax(curve[5].threshold), outputs, exit_costs=costs)
    assert curve[5].flops == r.mean_flops


def test_plot_accuracy_flops_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one curve"):
        analysis.plot_accuracy_flops({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\['a'\] have no points"):
        analysis.plot_accuracy_flops({"a": []}, tmp_path / "x.png")
