"""MultiExitNetwork called from several threads at once (issue #12 item 5): ``net(x)`` and
``net.early_exit(x, policy)`` give, bit for bit, what the same calls give one after another; hooks are
registered once, never per call, and the private stop signal never escapes."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from slvit_fast import CNNExit, CNNExitConfig, MultiExitNetwork, SLViTConfig, SLViTExit, policies as P
from slvit_fast.shape_probe import probe

K = 5
SIZES = [1, 3, 5, 8]  # mixed batch sizes: a batch size leaking between calls shows up as a shape error


class Block(nn.Module):
    """A residual block: compaction inside it would break ``x + f(x)``, so rows leave at its output."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return x + self.f(x)


def net_with_three_exits() -> MultiExitNetwork:
    torch.manual_seed(0)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), Block(8),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), Block(16), Block(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K),
    )
    slvit = SLViTExit(SLViTConfig(in_channels=8, feature_size=8, patch_size=2, embed_dim=16, num_heads=2,
                                  mlp_dim=32, head_hidden=32, num_outputs=K))  # default backend
    cnn = CNNExit(CNNExitConfig(in_channels=16, feature_size=4, filters=4, head_hidden=16, num_outputs=K))
    late = SLViTExit(SLViTConfig(in_channels=16, feature_size=4, patch_size=2, embed_dim=16, num_heads=2,
                                 mlp_dim=32, head_hidden=32, num_outputs=K), backend="torch")
    return MultiExitNetwork(backbone, {"1": slvit, "3.f.0": cnn, "4": late}).eval()


def jobs():
    """(kind, batch, policy) per call: full forwards and early exits where none, some or all leave early."""
    g = torch.Generator().manual_seed(3)
    policies = [P.MaxSoftmax([0.25, 0.3, 0.35]), P.MaxSoftmax(0.0), P.MaxSoftmax([None, None, None]), P.Patience(1),
                P.Entropy(1.0)]
    out = []
    for j in range(40):
        x = torch.randn(SIZES[j % len(SIZES)], 3, 8, 8, generator=g)
        out.append(("forward", x, None) if j % 3 == 0 else ("early", x, policies[j % len(policies)]))
    return out


def run(net, job):
    kind, x, policy = job
    if kind == "forward":
        return net(x)
    r = net.early_exit(x, policy)
    return r.outputs, r.exit_index, r.counts, r.evaluated


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def hook_counts(net):
    return {n: len(m._forward_hooks) for n, m in net.backbone.named_modules()}


def test_four_threads_mixed_batches_equal_sequential_bit_for_bit():
    net = net_with_three_exits()
    work = jobs()
    expected = [run(net, j) for j in work]
    hooks = hook_counts(net)
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t):
        start.wait()
        for rep in range(2):
            for i in range(t, len(work), 4) if rep == 0 else range(len(work) - 1 - t, -1, -4):
                try:
                    got = run(net, work[i])
                except BaseException as e:  # noqa: BLE001  (collected and reported below, whatever it is)
                    errors.append(e)
                    return
                if rep == 0:
                    results[i] = got
                elif not same(got, expected[i]):
                    errors.append(AssertionError(f"call {i} (repeat) differs from the sequential result"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, f"{len(errors)} call(s) failed; first: {errors[0]!r}"
    assert sorted(results) == list(range(len(work)))
    for i, want in enumerate(expected):
        assert same(results[i], want), f"call {i} ({work[i][0]}, batch {work[i][1].shape[0]}) differs"
    assert hook_counts(net) == hooks  # calls never add or remove hooks


def test_hooks_registered_once_and_inert_outside_calls():
    net = net_with_three_exits()
    hooked = [m for n, m in net.backbone.named_modules() if n in ("1", "3.f.0", "3", "4")]
    assert all(len(m._forward_hooks) == 1 for m in hooked)
    before = hook_counts(net)
    x = torch.randn(3, 3, 8, 8)
    net(x)
    net.early_exit(x, P.MaxSoftmax(0.3))
    net.feature_shapes(x)
    assert hook_counts(net) == before
    # the backbone called directly (no MultiExitNetwork call active) is untouched by the hooks
    with torch.no_grad():
        torch.testing.assert_close(net.backbone(x), net(x)[-1], rtol=0, atol=0)


def test_probe_in_one_thread_does_not_disturb_a_forward_in_another():
    """Shape probes (accounting, validate) watch through the same scoped hooks as real calls."""
    net = net_with_three_exits()
    x = torch.randn(5, 3, 8, 8)
    want = net(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def prober():
        while not stop.is_set():
            probe(net.backbone, [(1, 3, 8, 8)], ["1", "4"])

    th = threading.Thread(target=prober)
    th.start()
    try:
        for _ in range(20):
            try:
                assert same(net(x), want)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                break
    finally:
        stop.set()
        th.join()
    assert not errors, repr(errors[0])


def test_all_exited_never_escapes_from_threads():
    """Every sample leaving at exit 0 stops the backbone with a private signal: it must stay inside."""
    net = net_with_three_exits()
    everyone = P.MaxSoftmax(0.0)
    errors: list[BaseException] = []

    def worker(b):
        for _ in range(10):
            try:
                r = net.early_exit(torch.randn(b, 3, 8, 8), everyone)
                assert r.counts[0] == b and r.evaluated[1:] == [0, 0, 0]
                net(torch.randn(b, 3, 8, 8))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    threads = [threading.Thread(target=worker, args=(b,)) for b in SIZES]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"


def test_deep_copy_keeps_one_hook_per_module():
    import copy

    net = net_with_three_exits()
    twin = copy.deepcopy(net)
    x = torch.randn(3, 3, 8, 8)
    assert same(twin(x), net(x))
    assert hook_counts(twin) == hook_counts(net)
    r1, r2 = twin.early_exit(x, P.MaxSoftmax(0.3)), net.early_exit(x, P.MaxSoftmax(0.3))
    assert same(r1.outputs, r2.outputs) and r1.counts == r2.counts
