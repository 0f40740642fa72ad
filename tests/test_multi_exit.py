"""MultiExitNetwork: net(x), branch_features, frozen backbone, and early_exit with batch compaction
against the brute-force answer (every exit on every sample, then the policy) for every policy.

Exits use the plain torch backend here (the fused backends have their own tests). Small inputs keep this fast on a shared 2-core CPU: ResNet152 at 32x32 (branch maps 4x4) and AudioCSRNet
at 32x64 (4x8 maps); exit configs are built by the presets from the actual feature shapes.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from slvit_fast import SLViTConfig, SLViTExit, policies as P
from slvit_fast import presets
from slvit_fast.errors import SLViTInputError
from slvit_fast.multi_exit import MultiExitNetwork

warnings.filterwarnings("ignore", category=RuntimeWarning)  # backend 'auto' fallback notice
B = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = presets.build("resnet152", exit_type="slvit", input_size=32, exit_backend="torch")
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = net(x)
    return net, x, outs


@pytest.fixture(scope="module", params=["slvit", "cnn"])
def audio(request):
    torch.manual_seed(0)
    net = presets.build("audiocsrnet", exit_type=request.param, input_size=(32, 64), exit_backend="torch")
    x = presets.example_input("audiocsrnet", B, (32, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = net(x)
    return net, x, outs


def exit_for_8x8():
    """An SL-ViT exit configured for 8x8x512 maps (the branch-2 map of ResNet152 at 64x64, not at 32x32)."""
    return SLViTExit(SLViTConfig(in_channels=512, feature_size=(8, 8), patch_size=(2, 2)), backend="torch")


def same(result, expected):
    assert result.counts == expected.counts
    assert torch.equal(result.exit_index, expected.exit_index)
    # Compacted batches run the backbone at other batch sizes (other conv algorithms), so rounding differs
    # by a small fraction of the logits' scale; random-weight backbones reach |logits| ~ 1e6 (Inception-v3
    # at 96 px), where a per-element 1e-4 bound would be tighter than float32 accumulation allows.
    scale = max(1.0, float(expected.outputs.abs().max()))
    torch.testing.assert_close(result.outputs, expected.outputs, rtol=1e-4, atol=1e-4 * scale)
    assert result.outputs.shape[0] == result.exit_index.shape[0]


def midpoints(scores: torch.Tensor) -> float:
    """A threshold between the two middle scores (far from any score, so rounding cannot flip it)."""
    s = scores.sort().values
    k = len(s) // 2
    return float((s[k - 1] + s[k]) / 2)


# -- construction and plain forward ---------------------------------------------------------------
def test_forward_lists_exits_then_final(resnet):
    net, x, outs = resnet
    assert net.num_exits == 2 and len(outs) == 3
    assert net.exit_paths == ["layer2.0.conv2", "layer2"]
    assert net.compaction_points == ["layer2.0", "layer2"]
    assert list(net.exits.keys()) == ["layer2__0__conv2", "layer2"]
    assert all(o.shape == (B, 10) for o in outs)
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], net.backbone(x))


def test_backbone_frozen_and_kept_in_eval(resnet):
    net, _, _ = resnet
    assert not any(p.requires_grad for p in net.backbone.parameters())
    net.train()
    try:
        assert all(not m.training for m in net.backbone.modules())
        assert all(m.training for m in net.exits.modules())
    finally:
        net.eval()
    exit_ids = {id(p) for p in net.exit_parameters()}
    assert exit_ids == {id(p) for p in net.exits.parameters()}
    assert not exit_ids & {id(p) for p in net.backbone.parameters()}


def test_branch_features_feed_the_exits(resnet):
    net, x, outs = resnet
    feats = net.branch_features(x)
    assert [tuple(f.shape) for f in feats[:-1]] == [(B, 128, 4, 4), (B, 512, 4, 4)]
    with torch.no_grad():
        for i in range(net.num_exits):
            torch.testing.assert_close(net.exit_forward(i, feats[i]), outs[i])
    torch.testing.assert_close(feats[-1], outs[-1])


def test_training_step_reaches_only_exits(resnet):
    net, x, _ = resnet
    net.train()
    try:
        outs = net(x[:2])
        sum(o.sum() for o in outs[:-1]).backward()
    finally:
        net.eval()
    assert all(p.grad is not None for p in net.exit_parameters())
    assert all(p.grad is None for p in net.backbone.parameters())
    net.zero_grad(set_to_none=True)


def test_unknown_path_lists_near_matches(resnet):
    net, _, _ = resnet
    with pytest.raises(ValueError, match=r"layer2\.0\.conv9.*did you mean.*layer2\.0\.conv2"):
        MultiExitNetwork(net.backbone, {"layer2.0.conv9": torch.nn.Identity()})


def test_exit_config_mismatch_prints_actual_shape(resnet):
    net, x, _ = resnet
    bad = MultiExitNetwork(net.backbone, {"layer2": exit_for_8x8()})
    with pytest.raises(SLViTInputError, match=r"\(6, 512, 4, 4\).*expects.*\(8, 8\).*actual feature shape"):
        bad(x)


def test_module_run_twice_is_refused(resnet):
    """torchvision's Bottleneck calls its one ReLU module three times: no single feature map to read."""
    net, x, _ = resnet
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    bad = MultiExitNetwork(net.backbone, {"layer2.0.relu": head})
    with torch.no_grad(), pytest.raises(RuntimeError, match="ran more than once"):
        bad(x)


def test_validate_reports_actual_shapes_without_running(resnet):
    net, x, _ = resnet
    assert net.validate(x)["layer2"] == (B, 512, 4, 4)
    bad = MultiExitNetwork(net.backbone, {"layer2": exit_for_8x8()})
    with pytest.raises(ValueError, match=r"actual feature shape \(6, 512, 4, 4\).*expects C=512, H x W=8x8"):
        bad.validate(x)


def test_policy_validation():
    with pytest.raises(ValueError, match="not finite"):
        P.MaxSoftmax([0.5, float("nan")])
    with pytest.raises(ValueError, match="not finite"):
        P.Entropy([math.inf, 1.0])
    with pytest.raises(ValueError, match="outside"):
        P.Margin(1.5)
    with pytest.raises(ValueError, match="positive int"):
        P.Patience(0)
    with pytest.raises(ValueError, match="NaN|nan"):
        P.ClassThresholds([[0.5, float("nan")]])
    with pytest.raises(ValueError, match=">= 0"):
        P.Deadline(-1)
    with pytest.raises(ValueError, match="3 thresholds for 2 early exits"):
        P.MaxSoftmax([0.1, 0.2, 0.3]).check(2)
    with pytest.raises(ValueError, match="3 rows for 2 early exits"):
        P.ClassThresholds([[0.5] * 10] * 3).check(2)


def test_early_exit_rejects_wrong_threshold_count(resnet):
    net, x, _ = resnet
    with pytest.raises(ValueError, match="1 thresholds for 2 early exits"):
        net.early_exit(x, P.MaxSoftmax([0.5]))


# -- policies on hand-made outputs -----------------------------------------------------------------
def test_policy_rules_on_known_outputs():
    big = 20.0
    o0 = torch.tensor([[big, 0, 0], [0, 0, 0], [big, big, 0]])   # confident / uniform / two-way tie
    o1 = torch.tensor([[big, 0, 0], [0, big, 0], [0, big, 0]])
    final = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [0, 0, 1.0]])
    outs = [o0, o1, final]
    assert P.apply(P.MaxSoftmax(0.9), outs).exit_index.tolist() == [0, 1, 1]
    assert P.apply(P.MaxSoftmax([None, 0.9]), outs).exit_index.tolist() == [1, 1, 1]
    assert P.apply(P.Margin(0.9), outs).exit_index.tolist() == [0, 1, 1]
    assert P.apply(P.Entropy(0.1), outs).exit_index.tolist() == [0, 1, 1]
    assert P.apply(P.Entropy(0.75), outs).exit_index.tolist() == [0, 1, 0]  # ln 2 = 0.69 exits
    assert P.apply(P.Patience(1), outs).exit_index.tolist() == [1, 2, 2]  # row 2: argmax 0 then 1
    ct = P.ClassThresholds([[0.9, math.inf, 0.9], [math.inf, 0.9, 0.9]])  # class 0 early, class 1 later
    assert P.apply(ct, outs).exit_index.tolist() == [0, 1, 1]
    r = P.apply(P.RegressionCriterion(
        lambda i, y, prev: False if prev is None else (y == prev).all(dim=1)), outs)
    assert r.exit_index.tolist() == [1, 2, 2]
    d = P.apply(P.Deadline(1.5), outs, finish_times=[1.0, 2.0, 3.0])
    assert d.exit_index.tolist() == [0, 0, 0]


# -- early exit == brute force ---------------------------------------------------------------------
def classification_policies(outs):
    conf = [torch.softmax(o, 1).amax(1) for o in outs[:-1]]
    top2 = [torch.softmax(o, 1).topk(2, 1).values for o in outs[:-1]]
    marg = [t[:, 0] - t[:, 1] for t in top2]
    ent = [P.Entropy(0).score(o) for o in outs[:-1]]
    n = len(outs) - 1
    K = outs[0].shape[1]
    some_ct = [[midpoints(c)] * K for c in conf]
    for row in some_ct:
        row[::2] = [math.inf] * len(row[::2])  # even classes never exit early (class-specific design)
    crit_thr = [midpoints(o[:, 0]) for o in outs[:-1]]
    return {
        "maxsoftmax-none": P.MaxSoftmax([None] * n),
        "maxsoftmax-some": P.MaxSoftmax([midpoints(c) for c in conf]),
        "maxsoftmax-all": P.MaxSoftmax(0.0),
        "entropy-none": P.Entropy([None] * n),
        "entropy-some": P.Entropy([midpoints(e) for e in ent]),
        "entropy-all": P.Entropy(1e3),
        "margin-none": P.Margin([None] * n),
        "margin-some": P.Margin([midpoints(m) for m in marg]),
        "margin-all": P.Margin(0.0),
        "patience-1": P.Patience(1),
        "patience-none": P.Patience(n + 1),
        "class-none": P.ClassThresholds([[math.inf] * K] * n),
        "class-some": P.ClassThresholds(some_ct),
        "class-all": P.ClassThresholds([[0.0] * K] * n),
        "criterion-some": P.RegressionCriterion(lambda i, y, prev: y[:, 0] > crit_thr[i]),
        "deadline-inf": P.Deadline(math.inf),
    }


def test_early_exit_equals_brute_force_resnet152(resnet):
    net, x, outs = resnet
    seen = set()
    for name, policy in classification_policies(outs).items():
        expected = P.apply(policy, outs)
        result = net.early_exit(x, policy)
        same(result, expected)
        early = B - result.counts[-1]
        seen.add("none" if early == 0 else "all" if early == B else "some")
        if name.endswith("-none"):
            assert early == 0, name
        if name.endswith("-all"):
            assert result.counts[0] == B, name
        if name.endswith("-some"):
            assert 0 < early < B, (name, result.counts)
    assert seen == {"none", "some", "all"}


def test_early_exit_deadline_with_fake_clock(resnet):
    net, x, outs = resnet
    blocks = [m for n, m in net.backbone.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    now = [0]
    handles = [m.register_forward_hook(lambda *a: now.__setitem__(0, now[0] + 1)) for m in blocks]
    try:
        # exit 0 (inside layer2.0) finishes after the 3 blocks of layer1; exit 1 after 3 + 4 blocks
        n1 = len(net.backbone.layer1)
        finish = [n1, n1 + len(net.backbone.layer2), len(blocks)]
        for deadline in (0, n1 + 1, finish[1] + 1, len(blocks) + 1):
            now[0] = 0
            policy = P.Deadline(deadline, clock=lambda: now[0])
            result = net.early_exit(x, policy)
            same(result, P.apply(policy, outs, finish_times=finish))
    finally:
        for h in handles:
            h.remove()
    assert net.early_exit(x, P.Deadline(0)).counts[0] == B  # first exit always answers


def test_compaction_shrinks_the_batch_in_deeper_layers(resnet):
    net, x, outs = resnet
    conf = [torch.softmax(o, 1).amax(1) for o in outs[:-1]]
    policy = P.MaxSoftmax([midpoints(c) for c in conf])
    rows: dict[str, int] = {}
    watch = ["layer2.0.conv3", "layer2.1", "layer3", "layer4", "fc"]
    modules = dict(net.backbone.named_modules())
    handles = [modules[p].register_forward_pre_hook(lambda _m, a, p=p: rows.__setitem__(p, a[0].shape[0]))
               for p in watch]
    try:
        result = net.early_exit(x, policy)
    finally:
        for h in handles:
            h.remove()
    left0, left1 = B - result.counts[0], B - result.counts[0] - result.counts[1]
    assert 0 < result.counts[0] < B and left1 > 0
    assert rows["layer2.0.conv3"] == B          # still inside the block of the b1 exit (deferred compaction)
    assert rows["layer2.1"] == left0            # compacted at the block boundary layer2.0
    assert rows["layer3"] == rows["layer4"] == rows["fc"] == left1
    assert result.evaluated == [B, left0, left1]
    assert result.remaining == [left0, left1, 0]


def test_everyone_exits_early_skips_the_rest(resnet):
    net, x, _ = resnet
    calls = []
    h = net.backbone.layer3.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        r = net.early_exit(x, P.MaxSoftmax(0.0))
    finally:
        h.remove()
    assert r.counts == [B, 0, 0] and not calls


def test_batch_of_one_and_input_order(resnet):
    net, x, outs = resnet
    conf = torch.softmax(outs[0], 1).amax(1)
    policy = P.MaxSoftmax([midpoints(conf), None])
    full = net.early_exit(x, policy)
    for i in (0, B - 1):
        one = net.early_exit(x[i:i + 1], policy)
        assert one.exit_index.item() == full.exit_index[i].item()
        torch.testing.assert_close(one.outputs[0], full.outputs[i], rtol=1e-4, atol=1e-4)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    shuffled = net.early_exit(x[perm], policy)
    assert torch.equal(shuffled.exit_index, full.exit_index[perm])


def test_early_exit_equals_brute_force_audiocsrnet(audio):
    net, x, outs = audio
    assert net.exit_paths == ["encoders.visual", "encoders.visual#av1", "fusion.0.act"]
    assert net.compaction_points == ["encoders", "encoders", "fusion.0"]
    assert all(o.shape == (B, 1) for o in outs)
    thr = [midpoints(o[:, 0]) for o in outs[:-1]]
    policies = {
        "none": P.RegressionCriterion(lambda i, y, prev: torch.zeros(len(y), dtype=torch.bool)),
        "some": P.RegressionCriterion(lambda i, y, prev: y[:, 0] > thr[i]),
        "all": P.RegressionCriterion(lambda i, y, prev: True),
        "agree": P.RegressionCriterion(lambda i, y, prev: torch.zeros(len(y), dtype=torch.bool) if prev is None
                                       else (y - prev).abs()[:, 0] < (y - prev).abs()[:, 0].max() + 1),
        "deadline": P.Deadline(math.inf),
    }
    for name, policy in policies.items():
        expected = P.apply(policy, outs)
        result = net.early_exit(x, policy)
        same(result, expected)
    assert net.early_exit(x, policies["all"]).counts == [B, 0, 0, 0]
    some = net.early_exit(x, policies["some"])
    assert 0 < some.counts[0] < B


def test_audiocsrnet_compaction_rows(audio):
    net, x, outs = audio
    thr = [midpoints(o[:, 0]) for o in outs[:-1]]
    policy = P.RegressionCriterion(lambda i, y, prev: y[:, 0] > thr[i])
    rows = {}
    modules = dict(net.backbone.named_modules())
    handles = [modules[p].register_forward_pre_hook(lambda _m, a, p=p: rows.__setitem__(p, a[0][0].shape[0]))
               for p in ("fusion.0", "fusion.1", "head")]
    try:
        r = net.early_exit(x, policy)
    finally:
        for h in handles:
            h.remove()
    after_av1 = B - r.counts[0] - r.counts[1]
    # a stage that no sample reaches does not run at all (0 rows)
    assert rows.get("fusion.0", 0) == after_av1     # visual and audio tensors both compacted
    assert rows.get("fusion.1", 0) == rows.get("head", 0) == after_av1 - r.counts[2]
    assert r.evaluated == [B, B - r.counts[0], after_av1, after_av1 - r.counts[2]]
    features = net.branch_features(x)
    assert isinstance(features[1], tuple) and features[1][1].shape == (B, 128)
    with torch.no_grad():
        torch.testing.assert_close(net.exit_forward(1, features[1]), outs[1])


@pytest.mark.parametrize("name, size", [("densenet201", 64), ("inception_v3", 96)])
def test_early_exit_other_torchvision_presets(name, size):
    """Compaction at DenseNet201's transitions and Inception-v3's Mixed_5b/5c (direct children / Sequential)."""
    net = presets.build(name, input_size=size, exit_backend="torch")
    x = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        outs = net(x)
    conf = [torch.softmax(o, 1).amax(1) for o in outs[:-1]]
    policy = P.MaxSoftmax([midpoints(c) for c in conf])
    result = net.early_exit(x, policy)
    same(result, P.apply(policy, outs))
    assert 0 < result.counts[0] < B
    assert result.evaluated[1] == B - result.counts[0]


def test_audiocsrnet_deadline_with_fake_clock(audio):
    net, x, outs = audio
    stages = [net.backbone.encoders, *net.backbone.fusion]
    now = [0]
    handles = [m.register_forward_hook(lambda *a: now.__setitem__(0, now[0] + 1)) for m in stages]
    try:
        finish = [0, 0, 1, len(stages)]  # V1, AV1 inside the encoders; AV2 in fusion block 0; final
        for deadline, expected_exit in ((0.5, 1), (3, 2), (len(stages) + 1, 3)):
            now[0] = 0
            policy = P.Deadline(deadline, clock=lambda: now[0])
            result = net.early_exit(x, policy)
            same(result, P.apply(policy, outs, finish_times=finish))
            assert result.exit_index.tolist() == [expected_exit] * B
    finally:
        for h in handles:
            h.remove()


def _assert_empty_result(r, num_exits, k, dtype):
    assert r.outputs.shape == (0, k) and r.outputs.dtype == dtype
    assert r.exit_index.shape == (0,) and r.exit_index.dtype == torch.long
    assert r.counts == [0] * (num_exits + 1) and r.evaluated == [0] * (num_exits + 1)
    assert r.remaining == [0] * (num_exits + 1)


def test_empty_batch_is_an_empty_answer_everywhere(resnet):
    """Issue #12 item 8: net(x[:0]), early_exit and policies.apply agree on an empty batch."""
    net, x, outs = resnet
    empty = net(x[:0])
    assert [tuple(o.shape) for o in empty] == [(0, 10)] * 3
    assert [o.dtype for o in empty] == [o.dtype for o in outs]
    for policy in (P.MaxSoftmax([0.5, 0.5]), P.Patience(1), P.Deadline(math.inf)):
        _assert_empty_result(net.early_exit(x[:0], policy), 2, 10, outs[-1].dtype)
        _assert_empty_result(P.apply(policy, empty), 2, 10, outs[-1].dtype)
    with pytest.raises(ValueError, match="got 3 thresholds for 2 early exits"):
        net.early_exit(x[:0], P.MaxSoftmax([0.5, 0.5, 0.5]))  # still validated


def test_empty_batch_with_two_inputs(audio):
    net, (image, sound), outs = audio
    empty = net((image[:0], sound[:0]))
    assert [tuple(o.shape) for o in empty] == [(0, 1)] * 4
    r = net.early_exit((image[:0], sound[:0]), P.RegressionCriterion(lambda i, y, prev: True))
    _assert_empty_result(r, 3, 1, outs[-1].dtype)
