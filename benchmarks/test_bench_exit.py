"""The whole SL-ViT exit: forward (inference) and forward+backward, every usable implementation."""

import pytest

from conftest import BATCHES, DEVICE, PRESETS, implementations
from slvit_fast.bench.exit_bench import build_impls


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("preset", PRESETS)
def test_exit_forward(benchmark, preset, batch, impl):
    calls, _, flops = build_impls(preset, batch, "inference", DEVICE, include=(impl,))
    benchmark.extra_info["gflop_per_call"] = flops / 1e9
    out = benchmark(calls[impl])
    assert out.shape[0] == batch


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("preset", PRESETS[:1] if len(PRESETS) > 1 else PRESETS)
def test_exit_forward_backward(benchmark, preset, batch, impl):
    calls, _, flops = build_impls(preset, batch, "train", DEVICE, include=(impl,))
    benchmark.extra_info["gflop_per_call"] = 3 * flops / 1e9
    out = benchmark(calls[impl])
    assert out.shape[0] == batch
