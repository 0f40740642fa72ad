"""Training an exit on features made under ``torch.inference_mode()`` (issue #12 item 7).

A common pattern: the frozen backbone runs under ``inference_mode`` and only the exit is trained. The
reference (``torch`` backend) accepts such features; every fused backend must too, with the same
gradients. The fused ops used to save the inference tensor itself for backward, which autograd refuses
("Inference tensors cannot be saved for backward").
"""

from __future__ import annotations

import copy

import pytest
import torch

from slvit_fast import SLViTExit, backends

from kernel_cases import awkward_config, randomize_

FUSED = ("cpu", "cuda-emu", "triton")


def _available(name: str) -> str | None:
    reason = backends.status(torch.empty(1, 1, 1, 1)).get(name)
    return None if reason == "available" else reason


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_extra", [False, True], ids=["plain", "extra"])
def test_exit_trains_on_inference_mode_features(backend, with_extra):
    reason = _available(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    name = "grid16x9-h24-extra" if with_extra else "N25-h1"
    cfg = awkward_config(name, **({"in_channels": 2, "feature_size": (6, 8), "num_heads": 3} if with_extra else {}))
    ref = randomize_(SLViTExit(cfg, backend="torch")).train()
    ours = copy.deepcopy(ref)
    ours.backend = backend
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():  # e.g. a frozen backbone
        x = torch.randn(2, cfg.in_channels, *cfg.feature_size, generator=g)
        extra = torch.randn(2, cfg.extra_tokens, cfg.extra_dim, generator=g) if with_extra else None
    assert x.is_inference()
    target = torch.randn(2, cfg.num_outputs, generator=g)

    losses = []
    for module in (ref, ours):
        loss = (module(x, extra) - target).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert q.grad is not None, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", FUSED)
def test_inference_mode_forward_still_runs_inside_inference_mode(backend):
    """Inside ``inference_mode`` nothing is saved: the fused path runs and equals the reference."""
    reason = _available(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    cfg = awkward_config("N25-h1")
    ref = randomize_(SLViTExit(cfg, backend="torch")).eval()
    ours = copy.deepcopy(ref)
    ours.backend = backend
    with torch.inference_mode():
        x = torch.randn(2, cfg.in_channels, *cfg.feature_size)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
