"""The training path of backend "cpu" (forward with saved activations + backward, csrc/cpu/slvit_cpu.cpp).

The batch is cut into per-worker chunks run inside one parallel region per pass, the saved activations
written straight into the batch's tensors and every parameter gradient accumulated per worker and
reduced once. These tests check forward and every gradient against the reference for the shared matrix
of shapes under every work split: one thread / two threads, the default chunking and forced small
chunks (``SLVIT_FAST_CPU_TRAIN_CHUNK``: several chunks per worker, uneven last chunks, workers with one
sample), the fused path (default) on the AVX2 and AVX-512 GEMM tiles (``SLVIT_FAST_CPU_ISA``) and the
ATen/BLAS path (``SLVIT_FAST_CPU_TRAIN_FUSED=0``) with the opt-in AVX2 attention kernels and with no AVX2
training kernels (``SLVIT_FAST_CPU_TRAIN_KERNELS``), plus NaN isolation and split-independence of the
gradients. tests/test_cpu_train_fused.py checks what is specific to the fused path.
"""

from __future__ import annotations

import pytest
import torch

from cpu_train_splits import split_fixture
from kernel_cases import AWKWARD_CONFIGS, awkward_config, check_against_reference, check_nan_isolated, randomize_
from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
pytestmark = pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}")

# (threads, samples per chunk (None = default), AVX2 kernels of the ATen path (None = default), training path
# (None = fused on the auto ISA, "avx2"/"avx512" = fused on those tiles, "off" = ATen/BLAS)): cpu_train_splits.py
# (1 thread on the AVX2 tiles: tests/test_cpu_train_fused.py)
SPLITS = [(1, None, None), (2, None, None), (2, 1, None, "avx2"), (2, 3, None, "avx512"), (1, None, None, "off"),
          (2, 3, "gelu,attn", "off"), (2, None, "none", "off")]


split = split_fixture(SPLITS)


@pytest.mark.parametrize("name", list(AWKWARD_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_awkward_configs(name, batch, split):
    check_against_reference("cpu", awkward_config(name), batch)


@pytest.mark.parametrize("heads", [1, 24])
def test_heads(heads, split):
    check_against_reference("cpu", awkward_config("N25-h1", num_heads=heads, key_dim=8), 3)


def test_batch_64_two_layers_channels_last(split):
    check_against_reference("cpu", awkward_config("N49-nores-relu", num_layers=2), 64, channels_last=True)


@pytest.mark.parametrize("preset", ["resnet152-b1", "inceptionv3-b1-cifar100"])
@pytest.mark.parametrize("batch", [1, 5])
def test_presets(preset, batch, split):
    check_against_reference("cpu", SLViTConfig(**PRESETS[preset].slvit_kwargs()), batch)


# audiocsrnet-av1 (512 x 72 x 128 feature maps: ~5 s per batch-5 case, mostly the float64 reference and
# its inputs) runs under the splits that matter instead of all of them: batch 1 on one thread (fused on the
# auto ISA's tiles, ATen/BLAS), batch 5 on two workers with forced chunks (one sample per chunk on the
# fused AVX2 tiles; uneven 3 + 2 on the ATen/BLAS path).
audio_split = split_fixture([(1, None, None), (1, None, None, "off"), (2, 1, None, "avx2"), (2, 3, "gelu,attn", "off")])


def test_audio_preset(audio_split):
    batch = 1 if audio_split[0] == 1 else 5
    check_against_reference("cpu", SLViTConfig(**PRESETS["audiocsrnet-av1"].slvit_kwargs()), batch)


def test_nan_stays_in_its_sample(split):
    check_nan_isolated("cpu", batch=7, nan_at=(4, 0, 3, 4))


@pytest.mark.parametrize("path", ["1", "0"], ids=["fused", "aten"])
def test_gradients_do_not_depend_on_the_split(monkeypatch, path):
    """Chunking changes only the order of the per-worker gradient sums (float32 rounding)."""
    c = awkward_config("grid16x9-h24-extra")
    m = randomize_(SLViTExit(c, backend="cpu"))
    x = torch.randn(9, c.in_channels, *c.feature_size)
    extra = torch.randn(9, c.extra_tokens, c.extra_dim)

    def grads():
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        m(xi, extra).square().sum().backward()
        return [xi.grad] + [p.grad for p in m.parameters()]

    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_FUSED", path)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.delenv("SLVIT_FAST_CPU_TRAIN_CHUNK", raising=False)
        base = grads()
        torch.set_num_threads(2)
        for chunk in ("1", "4"):
            monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_CHUNK", chunk)
            for a, b in zip(grads(), base):
                # (some gradients are round-off around an exact 0, e.g. the key bias under softmax)
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-6)
    finally:
        torch.set_num_threads(n)
