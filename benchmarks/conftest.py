"""pytest-benchmark microbenchmarks: `pytest benchmarks/ --benchmark-only`.

SLVIT_BENCH_SMOKE=1 shrinks every benchmark to one small case (the default test suite runs each
benchmark once that way, see tests/test_benchmarks_smoke.py).
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from slvit_fast.bench.exit_bench import usable_fused_backends  # noqa: E402
from slvit_fast.exit_presets import list_presets  # noqa: E402

SMOKE = os.environ.get("SLVIT_BENCH_SMOKE", "") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESETS = ["resnet152-b1"] if SMOKE else [p for p in list_presets() if not p.endswith("-h24")]
BATCHES = [1] if SMOKE else [1, 64]


def implementations() -> list[str]:
    probe = torch.empty(1, 1, 1, 1, device=DEVICE)
    fused = [b for b in usable_fused_backends(probe) if not (DEVICE == "cpu" and b == "triton")]
    return ["eager", "compile", *fused]


@pytest.fixture(autouse=True)
def _few_threads_noise_free():
    torch.manual_seed(0)
    yield
