"""The kernel test matrix on a GPU: `triton` (compiled) and `cuda` (_C_cuda) on CUDA tensors vs the reference.

Runs only with ``SLVIT_FAST_TEST_DEVICE=cuda`` (``SLVIT_FAST_TEST_DEVICE=cuda bash scripts/test.sh`` on a
machine with an NVIDIA GPU); skipped otherwise, with the reason. The scenarios and tolerances are those
of the CPU suite (tests/kernel_cases.py: ``check_against_reference`` with the paired tolerances, forward
and the gradient of every input and parameter), run for both GPU backends: every preset at full size,
the awkward shapes (N = 25 / 49 / 144 / 16x9 grid with extra tokens, heads 1 to 24, key_dim 36,
non-square patches, no MLP residual + ReLU), batch 1 / 3 / 7 / 64, channels_last, two layers, +-1e4
inputs, a NaN staying in its sample; in fp32 (torch's default "highest" precision), TF32 (precision
"high"; with the TF32 tolerance of tests/test_cuda_mma.py), fp16 and bf16. The same-dtype torch reference
runs on the GPU too, so TF32 and half-precision matmul errors are paired with cuBLAS's own; the float64
reference runs on the CPU.

No interpreter and no emulator: conftest.py leaves TRITON_INTERPRET unset in this mode (and refuses it),
a test checks the Triton kernels are compiled, and the launch test finds our kernels in the CUDA
profiler's kernel list. A backend that is unavailable on the GPU (e.g. _C_cuda not built) fails its
tests with the reason rather than skipping them.
"""

from __future__ import annotations

import os

import pytest
import torch

import slvit_fast as sf
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.exit_presets import get_preset

from kernel_cases import (AWKWARD_CONFIGS, TOLERANCES, Tolerance, awkward_config, check_against_reference,
                          check_nan_isolated, randomize_)

CUDA_MODE = os.environ.get("SLVIT_FAST_TEST_DEVICE", "").strip().lower() == "cuda"
pytestmark = [
    pytest.mark.skipif(not CUDA_MODE, reason="GPU kernel matrix: run `SLVIT_FAST_TEST_DEVICE=cuda bash scripts/test.sh` "
                                             "on a machine with an NVIDIA GPU"),
    pytest.mark.skipif(CUDA_MODE and not torch.cuda.is_available(),
                       reason="SLVIT_FAST_TEST_DEVICE=cuda, but torch sees no CUDA device"),
]

BACKENDS = ("triton", "cuda")
# name -> (dtype, torch float32 matmul precision while the case runs, paired tolerance). TF32 keeps 10
# mantissa bits: the tolerance tests/test_cuda_mma.py and the selftest use for it; the others are
# kernel_cases.TOLERANCES, as in the CPU suite.
DTYPES = {"fp32": (torch.float32, "highest", TOLERANCES[torch.float32]),
          "tf32": (torch.float32, "high", Tolerance(factor=4.0, floor=2e-3)),
          "fp16": (torch.float16, "highest", TOLERANCES[torch.float16]),
          "bf16": (torch.bfloat16, "highest", TOLERANCES[torch.bfloat16])}
BATCHES = (1, 7, 64)  # + 3 in the awkward-shape and scenario tests


def _unique_preset_configs() -> dict[str, SLViTConfig]:
    """Preset name(s) -> config; presets with identical configs share one entry (ids list them all)."""
    groups: dict[SLViTConfig, list[str]] = {}
    for name in sf.list_presets():
        groups.setdefault(SLViTConfig(**get_preset(name).slvit_kwargs()), []).append(name)
    return {"+".join(names): cfg for cfg, names in groups.items()}


PRESET_CONFIGS = _unique_preset_configs()


def check(backend: str, config: SLViTConfig, batch: int, dtype_name: str, **kw) -> torch.Tensor:
    dtype, precision, tol = DTYPES[dtype_name]
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        return check_against_reference(backend, config, batch, dtype, device="cuda", tol=tol, **kw)
    finally:
        torch.set_float32_matmul_precision(saved)


def test_every_preset_is_covered():
    assert {n for key in PRESET_CONFIGS for n in key.split("+")} == set(sf.list_presets())


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("presets", list(PRESET_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset(backend, presets, dtype_name):
    """Full-size preset exits (real channel counts, 72x128 maps for AudioCSRNet), batch 1."""
    check(backend, PRESET_CONFIGS[presets], 1, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_batch64(backend, dtype_name):
    """The paper-size workload at batch 64 (the tensor-core case)."""
    check(backend, PRESET_CONFIGS[next(k for k in PRESET_CONFIGS if "resnet152-b1" in k.split("+"))], 64,
          dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_awkward(backend, name, dtype_name):
    check(backend, awkward_config(name), 3, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch(backend, batch, dtype_name):
    check(backend, awkward_config("grid16x9-h24-extra"), batch, dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last(backend, dtype_name):
    check(backend, awkward_config("N49-h8-kd36"), 3, dtype_name, channels_last=True)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_layers(backend, dtype_name):
    check(backend, awkward_config("nonsquare-patch", num_layers=2, mlp_residual=False, activation="relu"), 3,
          dtype_name)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude(backend, dtype_name):
    """+-1e4 features: the softmax stays finite and matches the reference."""
    cfg = awkward_config("N49-h8-kd36")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, cfg.in_channels, *cfg.feature_size, generator=g, dtype=torch.float64).sign() * 1e4
    x = x * torch.rand(x.shape, generator=g, dtype=torch.float64)
    out = check(backend, cfg, 3, dtype_name, x=x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_isolated(backend):
    check_nan_isolated(backend, device="cuda")


def test_triton_kernels_are_compiled():
    from slvit_fast.ops import triton_launch

    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] in ("", "0")
    assert not triton_launch.interpreted(), "the Triton kernels are interpreter objects: TRITON_INTERPRET was set"


# Our kernels as the CUDA profiler names them (Triton: the @triton.jit function; CUDA C++: demangled).
FORWARD_KERNELS = {"triton": ("patch_embed_fwd_kernel", "attention_fwd_kernel", "mlp_head_fwd_kernel"),
                   "cuda": ("slvit_encoder_kernel", "slvit_head_kernel")}
BACKWARD_KERNELS = {"triton": ("mlp_head_bwd_kernel", "attention_bwd_kernel", "patch_embed_bwd_kernel"),
                    "cuda": ("slvit_backward_kernel",)}


def _our_gpu_kernels(fn, names) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [k for k in kernels if any(n in k for n in names)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_gpu_launches(backend):
    """The forward runs our kernels on the GPU (the profiler sees them: not the interpreter, not the
    emulator, not a fallback): 3 Triton / 2 CUDA C++ launches, and the backward's fused kernels."""
    cfg = awkward_config("N25-h1")
    m = randomize_(SLViTExit(cfg, backend=backend)).eval().cuda()
    x = torch.randn(2, cfg.in_channels, *cfg.feature_size, device="cuda", requires_grad=True)
    m(x)  # compile / load first
    with torch.no_grad():
        fwd = _our_gpu_kernels(lambda: m(x), FORWARD_KERNELS[backend])
    assert len(fwd) == len(FORWARD_KERNELS[backend]), fwd
    assert all(any(n in k for k in fwd) for n in FORWARD_KERNELS[backend]), fwd
    y = m(x)
    bwd = _our_gpu_kernels(lambda: y.square().sum().backward(), BACKWARD_KERNELS[backend])
    assert len(bwd) == len(BACKWARD_KERNELS[backend]), bwd
