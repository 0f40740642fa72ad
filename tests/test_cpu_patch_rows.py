"""Patch gather / scatter of backend "cpu"'s training path (csrc/cpu/patch_rows.cpp: AVX2 kernels for a
unit stride along the copied run; the scalar loops of slvit_cpu.cpp's patch_permute otherwise, or with
``SLVIT_FAST_CPU_PATCH_SCALAR=1``).

The training forward gathers x into token-major patch rows (channel-major for NCHW inputs, pixel-major
for channels-inner ones), the backward gathers them again for dWp and scatters dx. Each case runs one
training step (x requiring grad) in awkward layouts and shapes - channels_last, channel slices of wider
tensors (batch/channel strides that are not the dense ones), W-strided inputs (no vector kernel: the
scalar path), non-square grids, patch widths 2/4/5/8 and an odd patch height, channel counts that are
not a multiple of 8, batch 1 and an odd batch - and asserts (1) the output, dx and every parameter
gradient against the float64 reference with the paired tolerance and (2) bit-for-bit equality with the
scalar gather/scatter (the gather is a permutation, so both paths feed identical patch rows).
"""

from __future__ import annotations

import copy

import pytest
import torch

from cpu_train_splits import split_fixture
from kernel_cases import SMALL_HIDDEN, TOLERANCES, assert_paired_close, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the vector patch kernels need AVX2"),
]

SCALAR = "SLVIT_FAST_CPU_PATCH_SCALAR"

# (threads, samples per chunk, ATen-path kernels, training path): cpu_train_splits.py
split = split_fixture([(1, None, None, None), (2, 2, None, None), (1, None, None, "off")])

# name: (in_channels, feature_size, patch_size)
SHAPES = {
    "p4-C13": (13, (28, 28), 4),           # the paper's 4x4 patches; C not a multiple of 8
    "p3x4-nonsquare": (5, (12, 20), (3, 4)),  # odd patch height (the 2-row pairs have a tail), 4x5 grid
    "p5-C6": (6, (20, 25), 5),             # pw = 5: masked runs
    "p8-C9": (9, (16, 24), 8),             # pw = 8: full 8-float runs; 2x3 grid
    "p2-C16": (16, (10, 10), 2),           # channels_last with C = 16: one run per patch row
}


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in the memory layout `layout` (a view into a wider buffer for the strided ones)."""
    B, C, H, W = x.shape
    if layout == "nchw":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # batch and channel strides of a (B, C + 3, H, W) tensor
        big = torch.full((B, C + 3, H, W), float("nan"), dtype=x.dtype)
        big[:, 1:1 + C] = x
        return big[:, 1:1 + C]
    if layout == "channels_last_slice":  # channels-inner, but pixels C + 3 floats apart
        big = torch.full((B, C + 3, H, W), float("nan"), dtype=x.dtype).contiguous(memory_format=torch.channels_last)
        big[:, 1:1 + C] = x
        return big[:, 1:1 + C]
    if layout == "w_strided":  # W stride 2: no vector kernel, the scalar loops
        big = torch.full((B, C, H, 2 * W), float("nan"), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "batch_h_strided":  # every other sample of a taller map
        big = torch.full((2 * B, C, H + 2, W), float("nan"), dtype=x.dtype)
        big[::2, :, 1:1 + H] = x
        return big[::2, :, 1:1 + H]
    raise ValueError(layout)


def step(m: SLViTExit, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, dx and parameter gradients of one training step."""
    m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = m(x)
    out.backward(grad_out.to(out.dtype))
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert x.grad is not None
    return out.detach(), x.grad, grads


def config_for(shape: str) -> SLViTConfig:
    C, size, patch = SHAPES[shape]
    return SLViTConfig(in_channels=C, feature_size=size, patch_size=patch, embed_dim=16, num_heads=2, key_dim=8,
                       **SMALL_HIDDEN)


def run_case(shape: str, layout: str, batch: int, monkeypatch, seed: int = 0) -> None:
    config = config_for(shape)
    base = randomize_(SLViTExit(config, backend="torch").double(), seed).train()
    ours = copy.deepcopy(base).float()
    ours.backend = "cpu"
    ref32 = copy.deepcopy(base).float()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, config.in_channels, *config.feature_size, generator=g, dtype=torch.float64)
    grad_out = torch.randn(batch, config.num_outputs, generator=g, dtype=torch.float64)

    out64, dx64, g64 = step(base, x, grad_out)
    out32, dx32, g32 = step(ref32, x.float(), grad_out)
    xl = make_layout(x.float(), layout)
    assert torch.equal(xl, x.float())
    monkeypatch.setenv(SCALAR, "0")
    out, dx, gours = step(ours, xl, grad_out)
    tol = TOLERANCES[torch.float32]
    assert_paired_close("output", out, out32, out64, tol)
    assert_paired_close("dx", dx, dx32, dx64, tol)
    for name in g64:
        assert_paired_close(f"grad {name}", gours[name], g32[name], g64[name], tol)

    monkeypatch.setenv(SCALAR, "1")
    out_s, dx_s, g_s = step(ours, xl, grad_out)
    assert torch.equal(out, out_s), "output differs between the vector and the scalar patch gather"
    assert torch.equal(dx, dx_s), "dx differs between the vector and the scalar patch scatter"
    for name in g_s:
        assert torch.equal(gours[name], g_s[name]), f"grad {name} differs between the vector and scalar paths"


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice", "channels_last_slice", "w_strided",
                                    "batch_h_strided"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_layouts_and_shapes(shape, layout, split, monkeypatch):
    run_case(shape, layout, 3, monkeypatch)


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_sizes(batch, layout, split, monkeypatch):
    run_case("p4-C13", layout, batch, monkeypatch, seed=batch)


def test_scalar_knob_rejects_other_values(monkeypatch):
    config = config_for("p4-C13")
    m = SLViTExit(config, backend="cpu").train()
    monkeypatch.setenv(SCALAR, "yes")
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_PATCH_SCALAR must be 0 or 1, got 'yes'"):
        m(torch.randn(2, config.in_channels, *config.feature_size)).sum().backward()
