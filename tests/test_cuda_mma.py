"""The CUDA kernels' tensor-core path (mma.sync; csrc/cuda/slvit_mma.cuh) run under the SIMT emulator.

fp16/bf16 always take it (m16n8k16, fp32 accumulate); float32 takes TF32 (m16n8k8) exactly when
torch.get_float32_matmul_precision() is not "highest", and stays exact SIMT otherwise. The emulator
implements mma.sync with the PTX ISA fragment layouts (tests/test_emu_mma_layout.py proves a wrong
layout is caught), so these runs check the kernels' fragment packing end to end against the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from kernel_cases import Tolerance, awkward_config, check_against_reference, randomize_, requires_half
from slvit_fast import SLViTExit
from slvit_fast.backends import cuda_emu_backend

reason = cuda_emu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cuda-emu backend not built: {reason}")

# TF32 keeps 10 mantissa bits: the same paired tolerance the selftest uses for "tf32"
TF32 = Tolerance(factor=4.0, floor=2e-3)


@contextlib.contextmanager
def matmul_precision(p: str):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@requires_half
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["N25-h1", "nonsquare-patch", "N49-nores-relu"])
def test_half_tensor_cores_forward_backward(name, dtype):
    """Ragged tiles (rows, cols and K not multiples of 16 / 8): every GEMM stage's bounds on the MMA path."""
    check_against_reference("cuda-emu", awkward_config(name), 1, dtype)


@requires_half
def test_half_two_layers_channels_last():
    check_against_reference("cuda-emu", awkward_config("N25-h1", num_layers=2, embed_dim=64, num_heads=2), 2,
                            torch.bfloat16, channels_last=True)


@pytest.mark.parametrize("name", ["N25-h1", "grid16x9-h24-extra", "nonsquare-patch"])
def test_tf32_forward_backward(name):
    with matmul_precision("high"):
        check_against_reference("cuda-emu", awkward_config(name), 2, torch.float32, tol=TF32)


def _outputs(precision: str) -> torch.Tensor:
    c = awkward_config("N49-h8-kd36")
    m = randomize_(SLViTExit(c, backend="cuda-emu")).eval()
    ref = randomize_(SLViTExit(c, backend="torch").double()).eval()
    x = torch.randn(2, c.in_channels, *c.feature_size, generator=torch.Generator().manual_seed(5))
    with matmul_precision(precision), torch.no_grad():
        return m(x), ref(x.double())


def test_tf32_only_when_allowed():
    """"highest" is exact SIMT (fp32 error level); "high"/"medium" round GEMM operands to TF32 (visibly larger
    error, within the TF32 tolerance) - so the switch really selects the tensor-core path."""
    exact, ref = _outputs("highest")
    tf32, _ = _outputs("high")
    medium, _ = _outputs("medium")
    scale = ref.abs().max().item()
    err_exact = (exact.double() - ref).abs().max().item()
    err_tf32 = (tf32.double() - ref).abs().max().item()
    assert err_exact < 1e-5 * scale, err_exact
    assert 1e-5 * scale < err_tf32 < 2e-3 * scale, (err_tf32, scale)
    assert torch.equal(tf32, medium)


@requires_half
def test_head_sixteen_samples_per_block_bf16():
    """The head runs 16 samples per block on tensor cores: batch 18 = one full and one partial block."""
    check_against_reference("cuda-emu", awkward_config("N25-h1", feature_size=(4, 4)), 18, torch.bfloat16,
                            backward=False)


@requires_half
def test_nan_stays_in_its_sample_in_the_shared_head_block():
    """Samples share a head block (GEMM rows): a NaN sample must not leak into its 15 neighbours."""
    c = awkward_config("N25-h1", feature_size=(4, 4))
    m = randomize_(SLViTExit(c, backend="cuda-emu")).eval().to(torch.bfloat16)
    ref = randomize_(SLViTExit(c, backend="torch")).eval().double()
    x = torch.randn(17, c.in_channels, *c.feature_size, generator=torch.Generator().manual_seed(2))
    x[3, 1, 0, 0] = float("nan")
    with torch.no_grad():
        out = m(x.to(torch.bfloat16)).double()
        expected = ref(x.double())
    others = [i for i in range(17) if i != 3]
    assert torch.isnan(out[3]).all()
    assert torch.isfinite(out[others]).all()
    scale = expected[others].abs().max()
    assert (out[others] - expected[others]).abs().max() < 3e-2 * scale
