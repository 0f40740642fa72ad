"""Each fused unit of the exit on its own (eager vs torch.compile; Triton ops on a GPU)."""

import pytest

from conftest import BATCHES, DEVICE, PRESETS
from slvit_fast.bench.op_bench import OPS, build_op_call


@pytest.mark.parametrize("impl", ["eager", "compile"])
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, batch, mode, impl):
    preset = PRESETS[0]
    out = benchmark(build_op_call(op, preset, batch, impl, mode, DEVICE))
    assert out.shape[0] == batch
