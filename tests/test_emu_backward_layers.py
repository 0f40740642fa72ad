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


def test_multi_layer_backward_is_the_kernel():
    """No torch recompute for deeper exits any more: the two backward launches, whatever num_layers."""
    c = awkward_config("N25-h1", num_layers=3)
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    out = m(torch.randn(1, c.in_channels, *c.feature_size))
    with count_kernel_launches() as launches:
        out.sum().backward()
    assert launches.count == 2 and "slvit_fast.cuda.exit_backward" in launches.by_kernel
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("max_blocks", ["1", "2"])
def test_blocks_with_several_samples_sum_their_partials(monkeypatch, max_blocks):
    """Fewer backward blocks than samples (each block sums several samples into its partial slot, the
    reduction sums the slots): same gradients as one sample per block."""
    monkeypatch.setenv("SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS", max_blocks)
    check_against_reference("cuda-emu", awkward_config("N25-h1", feature_size=(6, 6), num_layers=2), 5,
                            torch.float32)


def test_bad_max_blocks_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS", "0")
    c = awkward_config("N25-h1", feature_size=(4, 4))
    m = randomize_(SLViTExit(c, backend="cuda-emu"))
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CUDA_BACKWARD_MAX_BLOCKS"):
        m(torch.randn(2, c.in_channels, *c.feature_size)).sum().backward()
