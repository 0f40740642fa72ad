"""The CUDA backward kernel on multi-layer exits (num_layers 2..4), run under the SIMT emulator.

The kernel keeps one token checkpoint per layer and recomputes a layer's internals right before its
backward; every gradient (features, extra tokens, each layer's 16 parameters, embedding, head) is
checked against the float64 reference with the paired tolerances of tests/kernel_cases.py.
"""

from __future__ import annotations

import pytest
import torch

from kernel_cases import Tolerance, awkward_config, check_against_reference, randomize_, requires_half
from slvit_fast import SLViTExit
from slvit_fast.backends import cuda_emu_backend
from slvit_fast.profiling import count_kernel_launches

reason = cuda_emu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cuda-emu backend not built: {reason}")


@pytest.mark.parametrize("name", ["N25-h1", "nonsquare-patch"])
def test_two_layers_fp32(name):
    check_against_reference("cuda-emu", awkward_config(name, num_layers=2), 2, torch.float32)


@requires_half
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_layers_half(dtype):
    check_against_reference("cuda-emu", awkward_config("N25-h1", num_layers=2), 2, dtype)


def test_two_layers_tf32():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        check_against_reference("cuda-emu", awkward_config("N25-h1", num_layers=2), 1, torch.float32,
                                tol=Tolerance(factor=4.0, floor=2e-3))
    finally:
        torch.set_float32_matmul_precision(before)


def test_three_layers_extra_tokens_no_residual():
    c = awkward_config("grid16x9-h24-extra", feature_size=(6, 8), num_layers=3, mlp_residual=False,
                       activation="relu")
    check_against_reference("cuda-emu", c, 2, torch.float32)


def test_four_layers_channels_last():
    check_against_reference("cuda-emu", awkward_config("N49-h8-kd36", feature_size=(6, 6), num_layers=4), 1,
                            torch.float32, channels_last=True)


def test_multi_layer_backward_is_one_kernel_launch():
    """No torch recompute for deeper exits any more: one backward launch, whatever num_layers."""
    c = awkward_config("N25-h1", num_layers=3)
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    out = m(torch.randn(1, c.in_channels, *c.feature_size))
    with count_kernel_launches() as launches:
        out.sum().backward()
    assert launches.count == 1 and "slvit_fast.cuda.exit_backward" in launches.by_kernel
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
